"""An RL worker's loop: follow a model on a modelstate server and refresh a local nn.Module in
place on every new version, then act with it.

    PYTHONPATH=build/python /usr/bin/python3 python/examples/rl_worker.py \
        --server 127.0.0.1:50551 --model policy [--create] [--updates 3]

With --create the example first publishes a small policy network itself and, from a second
thread, loads --updates new versions of it, so it runs against an empty daemon. Each refresh
writes into the network's own tensors (every data_ptr() stays the same) and prints the version
and how long the refresh took. Ctrl-C stops it, publisher included, at once.
"""
import argparse
import sys
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


def publish_updates(client, model, count, stop):
    """A trainer stand-in: loads `count` perturbed versions, one every 0.2 s, until `stop` is
    set."""
    trainer = Policy()
    for _ in range(count):
        if stop.wait(0.2):
            return
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
    # Not a daemon thread: one ended by the interpreter's exit in the middle of a load aborts
    # the process. So the publisher stops when asked, and main asks it on every way out.
    stop = threading.Event()
    publisher = None
    if args.create:
        client.create(args.model, net)
        publisher = threading.Thread(target=publish_updates,
                                     args=(client, args.model, args.updates, stop))
        publisher.start()
    try:
        follow(client, args.model, net, args.updates if args.create else None)
    finally:
        stop.set()
        if publisher is not None:
            publisher.join()


def follow(client, model, net, updates):
    """Refreshes `net` on every version of `model` and acts with it; after `updates` UPDATED
    events when given, else until interrupted."""
    observation = torch.randn(1, 16)
    seen = 0
    with client.watch(model) as events:
        for event in events:
            if event.type not in ("CURRENT", "CREATED", "UPDATED"):
                print("model", event.model, event.type.lower())
                continue
            start = time.perf_counter()
            version = client.refresh(model, net)
            elapsed_ms = (time.perf_counter() - start) * 1e3
            with torch.no_grad():
                action = int(net(observation).argmax())
            print("version %d refreshed in %.2f ms; action %d" % (version, elapsed_ms, action),
                  flush=True)
            if updates is not None and event.type == "UPDATED":
                seen += 1
                if seen == updates:
                    return


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's code for "ended by SIGINT", without a traceback
