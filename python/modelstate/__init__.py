"""modelstate: the PyTorch client of a modelstate server.

    import modelstate, torch
    c = modelstate.connect("127.0.0.1:50551")
    sd = c.state_dict("policy")            # OrderedDict of torch tensors, sd.version
    c.refresh("policy", net)               # the server's weights into net, in place

The data path is the C++ client (the ``_modelstate`` extension): bytes go from
gRPC's buffers straight into the memory of torch tensors, with the GIL released
and every tensor's XXH3-64 checksum verified. Transfers honour Ctrl-C
(KeyboardInterrupt cancels the RPC; a cancelled load leaves the server's model
unchanged) and a Client may be used from several threads at once.

Failures raise ``modelstate.Error`` subclasses by status code (see
``modelstate._errors``); torch-semantics failures raise ``RuntimeError`` with
torch's own text ("Error(s) in loading state_dict for Net: ...").
"""

import collections
import json
import os

import torch

from . import _modelstate
from ._errors import *  # noqa: F401,F403  (the exception classes)
from ._errors import __all__ as _error_names

__all__ = ["connect", "Client", "ModelInfo", "TensorInfo", "Manifest", "Event",
           "StateDict", "LoadResult", "Watch"] + _error_names

ModelInfo = collections.namedtuple(
    "ModelInfo", "name version num_tensors num_bytes root_class")
ModelInfo.__doc__ = "A model at its current version, as models() lists it."

TensorInfo = collections.namedtuple(
    "TensorInfo", "name kind dtype shape nbytes xxh3")
TensorInfo.__doc__ = ("One state-dict entry of a manifest: kind is 'parameter' "
                      "or 'buffer'; dtype a torch.dtype, or the server's name "
                      "(e.g. 'uint16') when torch has no such type.")

Manifest = collections.namedtuple(
    "Manifest", "model version retained_versions tensors architecture_json")
Manifest.__doc__ = ("What info() returns: model (ModelInfo of the described "
                    "module), the version described, the retained versions "
                    "(newest first), tensors (OrderedDict key -> TensorInfo) "
                    "and the architecture spec ('' for models from tensors).")

Event = collections.namedtuple("Event", "type model version")
Event.__doc__ = ("A watch event; type is 'CURRENT' or 'ABSENT' (first event), "
                 "'CREATED', 'UPDATED' or 'DELETED'.")


class StateDict(collections.OrderedDict):
    """An OrderedDict of torch tensors in torch's key order, with the model
    version it was fetched at as ``.version``."""

    version = None


class LoadResult(torch.nn.modules.module._IncompatibleKeys):
    """torch's ``_IncompatibleKeys`` (missing_keys, unexpected_keys), plus the
    version committed (``.version``) and whether the load created the model
    (``.created``)."""

    version = None
    created = False


def _torch_dtype(name, key):
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            '"{}" has dtype {}, which torch {} cannot represent; pass dtype= '
            "to fetch it cast".format(key, name, torch.__version__))
    return dtype


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _dtype_or_name(name):
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else name


def _module_info(summary):
    return ModelInfo(*summary)


def _size(shape):
    return torch.Size(shape)


def _layout_of(net, prefix, tensors):
    """``net``'s layout for the C++ load rules (see _modelstate.cc ToLayout),
    gathering key -> own tensor into ``tensors`` on the way."""
    own = []
    for is_buffer, slots in ((False, net._parameters), (True, net._buffers)):
        for name, tensor in slots.items():
            persistent = not is_buffer or name not in net._non_persistent_buffers_set
            if tensor is None:
                own.append((name, is_buffer, None, persistent))
                continue
            lazy = torch.nn.parameter.is_lazy(tensor)
            shape = None if lazy else list(tensor.shape)
            own.append((name, is_buffer, (_dtype_name(tensor.dtype), shape), persistent))
            tensors[prefix + name] = tensor
    children = [(name, None if child is None else
                 _layout_of(child, prefix + name + ".", tensors))
                for name, child in net._modules.items()]
    return (type(net).__name__, own, children)


def _dict_layout(net, tensors):
    """A flat dict of tensors as a module tree: "a.b" is tensor b of child a."""
    root = (type(net).__name__, [], [])
    for key, tensor in net.items():
        node, *path = (root,) + tuple(key.split("."))[:-1]
        for part in path:
            found = [c for name, c in node[2] if name == part]
            if not found:
                found = [(part, [], [])]
                node[2].append((part, found[0]))
            node = found[0]
        node[1].append((key.rsplit(".", 1)[-1], False,
                        (_dtype_name(tensor.dtype), list(tensor.shape)), True))
        tensors[key] = tensor
    return root


def _load_targets(net, described, strict):
    """The key -> local tensor pairs of ``_load_plan``."""
    return _load_plan(net, described, strict)[0]


def _load_plan(net, described, strict):
    """torch's load_state_dict checks of ``net`` (an nn.Module or a dict of
    tensors) against the fetched (key, kind, dtype, shape, ...) descriptions,
    run by the C++ rule the daemon applies: the key -> local tensor pairs to
    fill, and key -> dtype name of those the server should cast (floating
    tensors whose destination is of another floating dtype); RuntimeError
    with torch's text otherwise."""
    tensors = {}
    if isinstance(net, torch.nn.Module):
        layout = _layout_of(net, "", tensors)
    else:
        layout = _dict_layout(net, tensors)
    fetched = [(d[0], d[2], list(d[3])) for d in described]
    error, keys, casts = _modelstate.plan_load_into(layout, fetched, strict)
    if error is not None:
        raise RuntimeError(error)
    return (collections.OrderedDict((key, tensors[key]) for key in keys),
            casts)


def _destinations(fetched, targets):
    """(key, dtype, shape, data_ptr) of each fetched key's target tensor."""
    destinations = []
    for key, _, _, shape, _, _ in fetched:
        tensor = targets[key].detach()
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(
                '"{}" must be a contiguous CPU tensor to be refreshed '
                "in place".format(key))
        destinations.append((key, _dtype_name(tensor.dtype), list(shape),
                             tensor.data_ptr()))
    return destinations


def _selected_keys(described, targets):
    """The keys a refresh fetches: None (every key, which lets the server
    serve its shared whole-model state dict) when ``targets`` has them all."""
    if len(targets) == len(described):
        return None
    return [d[0] for d in described if d[0] in targets]


def _fetch_args(module, keep_module_prefix, keys, recurse, include_buffers,
                dtype, version):
    return {"module": module, "keep_module_prefix": keep_module_prefix,
            "keys": list(keys) if keys is not None else None,
            "recurse": recurse, "include_buffers": include_buffers,
            "dtype": _dtype_name(dtype) if dtype is not None else None,
            "version": version}


class Watch:
    """An iterator over a model's events (``Event``). The first is CURRENT or
    ABSENT; then one per commit. It ends when closed (``close()``, leaving a
    ``with`` block, or garbage collection); Ctrl-C while waiting raises
    KeyboardInterrupt and closes it."""

    def __init__(self, watcher):
        self._watcher = watcher

    def __iter__(self):
        return self

    def __next__(self):
        return Event(*self._watcher.next())

    def close(self):
        """Stops the watch; iteration then ends."""
        self._watcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client:
    """A connection to a modelstate server. Create with ``connect``.
    Thread-safe: several threads may call it at once."""

    def __init__(self, native, local=False):
        self._c = native
        # Fetches go through the same-host socket (connect's local_socket).
        self._local = local

    def models(self):
        """Returns every model, ordered by name, as ``ModelInfo``."""
        return [_module_info(s) for s in self._c.list_models()]

    def info(self, model, module=None, version=None, min_version=None):
        """Returns the ``Manifest`` of ``model`` (of submodule ``module`` when
        given; at retained ``version`` when given): per key its kind, dtype,
        shape, nbytes and xxh3. Raises NotFound for an unknown model, module or
        version. min_version: first wait until the model is at this version or
        later (consistent reads); Unavailable if the server does not get there
        within the call's timeout or its --max_version_wait."""
        raw = self._c.get_model(model, module or "", version or 0,
                                min_version or 0)
        tensors = collections.OrderedDict(
            (name, TensorInfo(name, kind, _dtype_or_name(dtype), _size(shape),
                              nbytes, xxh3))
            for name, kind, dtype, shape, nbytes, xxh3 in raw["tensors"])
        return Manifest(_module_info(raw["summary"]), raw["version"],
                        list(raw["retained_versions"]), tensors,
                        raw["architecture_json"])

    def versions(self, model):
        """Returns the versions of ``model`` the server retains, newest first
        (``rollback`` accepts any of them)."""
        return self.info(model).retained_versions

    def state_dict(self, model, module=None, keep_module_prefix=True,
                   keys=None, recurse=True, include_buffers=True, dtype=None,
                   version=None, chunk_bytes=0, progress=None,
                   min_version=None):
        """Fetches ``model.get_submodule(module).state_dict()`` as a
        ``StateDict`` (OrderedDict key -> torch.Tensor, torch's key order,
        every checksum verified) with ``.version``.

        module: dotted submodule path (None: the whole model);
        keep_module_prefix: keys keep the module's path ("encoder.fc.weight")
        rather than being relative to it; keys: only these keys, in this order;
        recurse: False gives the module's own tensors only; include_buffers:
        False gives parameters only; dtype: cast floating tensors to this
        torch floating dtype on the server (as ``tensor.to(dtype)``); version:
        a retained version (None: the current one); chunk_bytes: bytes per
        message (0: the server's default); progress: called as
        progress(bytes_done, bytes_total); min_version: first wait until the
        model is at this version or later (consistent reads: a trainer's
        ``load_state_dict(...).version``), Unavailable if the server does not
        get there in time. A dropped connection is resumed from the byte
        reached, of the same version.

        Each tensor is allocated by torch and filled by C++ with the GIL
        released. Through the same-host socket (``local_socket``) the tensors
        are instead views of the daemon's export (or of the region it filled),
        mapped copy-on-write: no private copy exists until a tensor is
        written, and then only of the pages written. Raises TypeError naming the key for a dtype torch 1.13 lacks
        (unsigned 16/32/64-bit, float8) unless ``dtype`` casts it.
        """
        args = _fetch_args(module, keep_module_prefix, keys, recurse,
                           include_buffers, dtype, version)
        args["min_version"] = min_version
        if self._local:
            return self._state_dict_as_views(model, args, chunk_bytes,
                                             progress)
        tensors = []

        def allocate(described):
            destinations = []
            for name, _, dtype_name, shape, _, _ in described:
                tensor = torch.empty(shape, dtype=_torch_dtype(dtype_name, name))
                tensors.append((name, tensor))
                destinations.append((name, dtype_name, shape,
                                     tensor.data_ptr()))
            return destinations

        # Fresh memory nobody else sees: write in place, no staging copy.
        fetched_version, _ = self._c.fetch_into(model, args, allocate, True,
                                                chunk_bytes, progress)
        result = StateDict(tensors)
        result.version = fetched_version
        return result

    def _state_dict_as_views(self, model, args, chunk_bytes, progress):
        """state_dict through the same-host socket: every tensor a view of
        the daemon's export (or of the region it filled), mapped
        copy-on-write, so no private copy exists until a tensor is written
        (and then only of the pages written)."""
        version, fetched = self._c.fetch_views(model, args, chunk_bytes,
                                               progress)
        result = StateDict()
        for name, _, dtype_name, shape, data in fetched:
            dtype = _torch_dtype(dtype_name, name)
            if memoryview(data).nbytes == 0:
                result[name] = torch.empty(shape, dtype=dtype)
            else:
                result[name] = torch.frombuffer(data, dtype=dtype).view(shape)
        result.version = version
        return result

    def refresh(self, model, net, module=None, strict=True, version=None,
                allow_partial_write=False, chunk_bytes=0, progress=None,
                min_version=None, cast_on_server=True):
        """Copies the server's weights into ``net``'s own tensors in place, as
        ``net.load_state_dict(server_state_dict, strict)`` would, without
        allocating them: every ``data_ptr()`` stays the same, checksums
        verified. Returns the version fetched.

        net: an nn.Module (or a dict of contiguous CPU tensors) shaped like
        ``module`` of the model (None: the whole model); keys are relative to
        ``module``. strict: as torch's; the key and size checks run on the
        model's manifest before any byte moves and raise RuntimeError with
        torch's text. Only the keys ``net`` has are fetched: an adapter-only
        ``net`` moves the adapter's bytes, not the model's (through the
        same-host socket, ``local_socket``, every key of the selection is
        copied from shared memory and cast here instead).
        cast_on_server: True (default) has the server cast each floating
        tensor to the dtype of the tensor it fills, so a bfloat16 ``net``
        refreshing from a float32 model moves and stages half the bytes;
        False fetches the stored dtypes and casts here (torch's ``copy_``
        rule, bit for bit the same result).
        allow_partial_write: False (default) receives everything into a
        staging copy and writes ``net`` only once the whole fetch arrived
        intact, so a failed refresh leaves ``net`` unchanged (cost: the
        fetched bytes once more, briefly); True writes straight into ``net``
        (no extra memory) but a failure midway leaves ``net`` partly updated.
        min_version: as for ``state_dict``; the fetch never serves an older
        version than the manifest the checks ran on.
        """
        if self._local:
            return self._refresh_as_fetched(model, net, module, strict,
                                            version, allow_partial_write,
                                            chunk_bytes, progress, min_version)
        raw = self._c.get_model(model, module or "", version or 0,
                                min_version or 0)
        prefix = module + "." if module else ""
        described = [(name[len(prefix):], kind, dtype, shape)
                     for name, kind, dtype, shape, _, _ in raw["tensors"]]
        targets, casts = _load_plan(net, described, strict)
        if not targets:
            return raw["version"]
        args = _fetch_args(module, False, _selected_keys(described, targets),
                           True, True, None, version)
        if cast_on_server:
            args["key_dtypes"] = casts or None
        args["min_version"] = None if version else raw["version"]

        def allocate(fetched):
            for key, _, _, _, _, _ in fetched:
                if key not in targets:
                    raise RuntimeError(
                        'the server sent "{}", which the manifest checked '
                        "before the fetch did not have: model \"{}\" was "
                        "recreated meanwhile; refresh again".format(key, model))
            return _destinations(fetched, targets)

        fetched_version, _ = self._c.fetch_into(
            model, args, allocate, allow_partial_write, chunk_bytes, progress)
        return fetched_version

    def _refresh_as_fetched(self, model, net, module, strict, version,
                            allow_partial_write, chunk_bytes, progress,
                            min_version):
        """refresh through the same-host socket, which serves fetches only:
        one fetch of the selection, checked against ``net`` on its own
        manifest (copies from shared memory cost little, so every key comes,
        as stored, and is cast here)."""
        def allocate(fetched):
            targets = _load_targets(net, fetched, strict)
            return _destinations(
                [d for d in fetched if d[0] in targets], targets)

        args = _fetch_args(module, False, None, True, True, None, version)
        args["min_version"] = min_version
        fetched_version, _ = self._c.fetch_into(
            model, args, allocate, allow_partial_write, chunk_bytes, progress)
        return fetched_version

    def load_state_dict(self, model, state_dict, strict=True, assign=False,
                        module=None, expected_version=None, create=False,
                        chunk_bytes=0, progress=None):
        """Loads ``state_dict`` (a mapping of tensors, or an nn.Module whose
        state_dict() is sent) into ``model`` atomically, as torch's
        ``model.get_submodule(module).load_state_dict(state_dict, strict)``;
        ``assign=True`` keeps the checkpoint's dtypes. Returns a
        ``LoadResult`` (torch's (missing_keys, unexpected_keys)) with
        ``.version``.

        expected_version: commit only if the model is at this version
        (VersionConflict otherwise; 0: it must not exist). create: create the
        model from these tensors if it does not exist (an nn.Module also
        sends its buffers and class names). Strict-key and size errors raise
        FailedPrecondition, a RuntimeError with torch's exact text.
        """
        buffer_keys, class_names = [], {}
        if isinstance(state_dict, torch.nn.Module):
            net = state_dict
            state_dict = net.state_dict()
            if create:
                buffer_keys, class_names = _module_layout(net, state_dict)
        # Keep every tensor alive (and contiguous, on the CPU) for the call:
        # C++ reads their memory in place.
        tensors, keep = [], []
        for key, value in state_dict.items():
            tensor = value.detach().cpu().contiguous()
            keep.append(tensor)
            tensors.append((key, _dtype_name(tensor.dtype), list(tensor.shape),
                            tensor.data_ptr(),
                            tensor.numel() * tensor.element_size()))
        args = {"module": module or "", "strict": strict, "assign": assign,
                "expected_version": expected_version,
                "create_if_missing": create, "buffer_keys": buffer_keys,
                "class_names": class_names}
        version, missing, unexpected, created = self._c.load(
            model, tensors, args, chunk_bytes, progress)
        result = LoadResult(list(missing), list(unexpected))
        result.version = version
        result.created = created
        return result

    def create(self, model, net=None, arch=None, seed=0):
        """Creates ``model`` and returns its ``ModelInfo``.

        From an nn.Module ``net``: its state_dict (parameters and persistent
        buffers, buffers marked as such) and each module's class name
        (``type(m).__name__`` per path), so the server's messages read "for
        Net:". From an architecture spec ``arch`` (a JSON string or a dict)
        initialised with ``seed``. Raises AlreadyExists if the name is taken.
        """
        if (net is None) == (arch is None):
            raise ValueError("create needs exactly one of net= and arch=")
        if arch is not None:
            if not isinstance(arch, str):
                arch = json.dumps(arch)
            return _module_info(self._c.create_model(model, arch, seed))
        try:
            self.load_state_dict(model, net, strict=True, expected_version=0,
                                 create=True)
        except VersionConflict as error:
            raise AlreadyExists(
                'model "{}" already exists ({})'.format(model, error)) from None
        return self.info(model).model

    def delete(self, model):
        """Deletes ``model``. Raises NotFound if it does not exist."""
        self._c.delete_model(model)

    def rollback(self, model, version):
        """Makes retained ``version`` current again, as a new version; returns
        the ``ModelInfo`` at that new version. NotFound if not retained."""
        return _module_info(self._c.rollback(model, version))

    def watch(self, model, min_version=None):
        """Returns a ``Watch``: iterate it for ``Event(type, model, version)``
        as the model changes; it ends when closed. With min_version, the first
        event (CURRENT) waits until the model is at that version or later."""
        return Watch(self._c.watch(model, min_version or 0))


def _module_layout(net, state_dict):
    """The buffer keys of ``state_dict`` and each module path's class name."""
    buffers = {name for name, _ in net.named_buffers()}
    buffer_keys = [key for key in state_dict if key in buffers]
    class_names = {path: type(m).__name__ for path, m in net.named_modules()}
    return buffer_keys, class_names


def connect(target, tls_ca=None, tls_cert=None, tls_key=None, use_tls=False,
            lb_policy=None, timeout=None, own_connection=False, token=None,
            local_socket=None):
    """Returns a ``Client`` of the server at ``target`` ("host:port",
    "dns:///name:port", ...) without waiting for the connection.

    tls_ca: CA file (enables TLS); tls_cert/tls_key: a client certificate
    (mTLS); use_tls: TLS with the system's roots; lb_policy: gRPC load
    balancing policy, e.g. "round_robin"; timeout: seconds per call (None: no
    deadline); own_connection: a TCP connection of this client's own;
    token: a bearer token for a server with an auth policy (default: the
    ``MODELSTATE_TOKEN`` environment variable, if set), sent with every call as
    "authorization: Bearer <token>" metadata.
    local_socket: the path of the daemon's --local_socket when it runs on this
    host, so that state_dict and refresh go through shared memory instead of
    TCP (the default for a "unix:PATH" target is PATH.local; TCP is used when
    nothing listens there).
    """
    if token is None:
        token = os.environ.get("MODELSTATE_TOKEN", "").strip()
    return Client(_modelstate.Client.connect(
        target, tls_ca or "", tls_cert or "", tls_key or "", use_tls,
        lb_policy or "", float(timeout or 0), own_connection, token,
        local_socket or ""), local=bool(local_socket) or target.startswith("unix:"))
