"""An RL worker's loop: follow a model on a modelstate server and refresh a local nn.Module in
place on every new version, then act with it.

    PYTHONPATH=build/python /usr/bin/python3 python/examples/rl_worker.py \
        --server 127.0.0.1:50551 --model policy [--create] [--updates 3]

With --create the example first publishes a small policy network itself and, from a second
thread, loads --updates new versions of it, so it runs against an empty daemon. Each refresh
writes into the network's own tensors (every data_ptr() stays the same) and prints the version
and how long the refresh took. Ctrl-C stops it.
"""
import argparse
import threading
import time

import torch
from torch import nn

import modelstate


class Policy(nn.Module):
    def __init__(self, observations=16, actions=4, hidden=64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(observations, hidden), nn.Tanh(),
                                  nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, actions)

    def forward(self, x):
        return self.head(self.body(x))


def publish_updates(client, model, count):
    """A trainer stand-in: loads `count` perturbed versions, one every 0.2 s."""
    trainer = Policy()
    for _ in range(count):
        time.sleep(0.2)
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(0.01 * torch.randn_like(p))
        client.load_state_dict(model, trainer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50551")
    parser.add_argument("--model", default="policy")
    parser.add_argument("--create", action="store_true",
                        help="publish the model and --updates versions of it first")
    parser.add_argument("--updates", type=int, default=3,
                        help="with --create: versions to publish; stop after seeing them")
    args = parser.parse_args()

    client = modelstate.connect(args.server)
    net = Policy()
    publisher = None
    if args.create:
        client.create(args.model, net)
        publisher = threading.Thread(target=publish_updates,
                                     args=(client, args.model, args.updates))
        publisher.start()
    observation = torch.randn(1, 16)
    seen = 0
    with client.watch(args.model) as events:
        for event in events:
            if event.type not in ("CURRENT", "CREATED", "UPDATED"):
                print("model", event.model, event.type.lower())
                continue
            start = time.perf_counter()
            version = client.refresh(args.model, net)
            elapsed_ms = (time.perf_counter() - start) * 1e3
            with torch.no_grad():
                action = int(net(observation).argmax())
            print("version %d refreshed in %.2f ms; action %d" % (version, elapsed_ms, action),
                  flush=True)
            if args.create and event.type == "UPDATED":
                seen += 1
                if seen == args.updates:
                    break
    if publisher is not None:
        publisher.join()


if __name__ == "__main__":
    main()
