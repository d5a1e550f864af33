"""Offload (FlexGen / ZeRO-Inference style): decoder layers' weights live off the device and
stream in one layer ahead of use, so the device holds the embedding, the head and two layer
buffers, whatever the depth.

- `cpu`: each layer's tensors stay in host memory (pinned on an accelerator) and are copied
  into a device buffer.
- `disk`: the layers are written once to a safetensors file and read back with pread into
  the buffer before every use (the page cache serves repeated reads unless `cold`, which
  drops the file from it before each forward so every read reaches the disk).

While layer i computes in one buffer, a background thread fills the other with layer i+1
(the last layer prefetches the first, for the next forward). accelerate's offload hooks
(`cpu_offload`, `disk_offload`) move a module's weights synchronously when it is called and
have no prefetch, so the copy would never overlap compute; hence this small streamer.
On a CPU "device" and "host" are one memory: `cpu` then only adds a copy per layer per
forward, which is what it costs; `disk` shows what reading the weights from a file costs.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from common.core.errors import RecipeError

MODES = ("none", "cpu", "disk")
Slot = dict[str, Tensor]  # one layer's tensors, by name inside the layer


def _layer_tensors(layer: nn.Module) -> dict[str, tuple[nn.Module, str, Tensor]]:
    """name -> (owning module, leaf, tensor) for every parameter and buffer of the layer."""
    out = {}
    for mod_name, module in layer.named_modules():
        for store in (module._parameters, module._buffers):
            for leaf, t in store.items():
                if t is not None:
                    out[f"{mod_name}.{leaf}" if mod_name else leaf] = (module, leaf, t)
    return out


class LayerStreamer:
    """Binds each layer to a device buffer just before it runs (a forward pre-hook) and
    fills the other buffer with the next layer meanwhile."""

    def __init__(
        self, layers: nn.ModuleList, mode: str, device: torch.device, directory: Path, cold: bool
    ) -> None:
        self.layers, self.mode, self.device, self.cold = layers, mode, device, cold
        self.owners = [_layer_tensors(layer) for layer in layers]
        shapes = [{n: (t.shape, t.dtype) for n, (_, _, t) in o.items()} for o in self.owners]
        if any(s != shapes[0] for s in shapes):
            raise RecipeError("offload streams layers through shared buffers: layers must match")
        pin = device.type != "cpu"  # page-locked host memory: async copies to the device
        first = {n: t for n, (_, _, t) in self.owners[0].items()}
        self.slots: list[Slot] = [
            {n: torch.empty_like(t, device=device) for n, t in first.items()} for _ in range(2)
        ]
        self.params = [
            {n: nn.Parameter(t, requires_grad=False) for n, t in slot.items()}
            for slot in self.slots
        ]
        for t in (t for group in (*self.slots, *self.params) for t in group.values()):
            t.refilled_in_place = True  # each layer's weights in turn: kernels must not cache
        self.host: list[Slot] = []
        self.file: Path | None = None
        if mode == "cpu":
            for owner in self.owners:
                host = {n: t.detach().to("cpu", copy=True) for n, (_, _, t) in owner.items()}
                self.host.append({n: t.pin_memory() if pin else t for n, t in host.items()})
        else:
            self.file, self.offsets = self._write(directory)
            self.fd = os.open(self.file, os.O_RDONLY)
            self.file.unlink()  # gone with the process, however it ends; the fd still reads
            # a pinned staging buffer per slot on accelerators; the slot itself on cpu
            self.staging = [
                {n: torch.empty_like(t, device="cpu").pin_memory() for n, t in first.items()}
                if pin
                else slot
                for slot in self.slots
            ]
        for i in range(len(layers)):
            self._bind(i, i % 2)  # the original tensors are freed: buffers only from here on
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-prefetch")
        self.pending: tuple[int, int, Future] | None = None  # (layer, slot, its fill)
        self.last_slot = 1
        self.stream = torch.get_device_module(device.type).Stream() if pin else None
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, args, i=i: self._before(i))

    # -- the layer file (disk)
    def _write(self, directory: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix="offload-", suffix=".safetensors")
        os.close(fd)
        tensors = {
            f"{i}.{n}": t.detach().to("cpu").contiguous()
            for i, owner in enumerate(self.owners)
            for n, (_, _, t) in owner.items()
        }
        save_file(tensors, name)
        with open(name, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        base = 8 + size
        offsets = {
            k: (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items()
            if k != "__metadata__"
        }
        return Path(name), offsets

    def _read(self, layer: int, slot: int) -> None:
        for name, buf in self.staging[slot].items():
            offset, nbytes = self.offsets[f"{layer}.{name}"]
            view = memoryview(buf.view(torch.uint8).numpy()).cast("B")
            if os.preadv(self.fd, [view], offset) != nbytes:
                raise RecipeError(f"offload file {self.file} is shorter than its header says")

    # -- streaming
    def _fill(self, layer: int, slot: int) -> None:
        """Bring `layer` into buffer `slot` (in the prefetch thread, or inline)."""
        if self.mode == "disk":
            self._read(layer, slot)
            sources = self.staging[slot]
        else:
            sources = self.host[layer]
        if sources is self.slots[slot]:
            return
        if self.stream is None:
            for n, dst in self.slots[slot].items():
                dst.copy_(sources[n])
            return
        with torch.get_device_module(self.device.type).stream(self.stream):  # unverified
            for n, dst in self.slots[slot].items():
                dst.copy_(sources[n], non_blocking=True)
        self.stream.synchronize()

    def _bind(self, layer: int, slot: int) -> None:
        for name, (module, leaf, _) in self.owners[layer].items():
            store = module._parameters if leaf in module._parameters else module._buffers
            store[leaf] = (
                self.params[slot][name] if store is module._parameters else self.slots[slot][name]
            )

    def _before(self, layer: int) -> None:
        if self.pending and self.pending[0] == layer:
            _, slot, fill = self.pending
            fill.result()  # re-raises a failed read here
        else:  # the first forward, or layers called out of order: load inline
            slot = 1 - self.last_slot
            if self.cold and layer == 0:
                self.drop_page_cache()
            self._fill(layer, slot)
        self._bind(layer, slot)
        self.last_slot = slot
        nxt = (layer + 1) % len(self.layers)
        if self.cold and nxt == 0:
            self.drop_page_cache()
        self.pending = (nxt, 1 - slot, self.pool.submit(self._fill, nxt, 1 - slot))

    def drop_page_cache(self) -> None:
        """Evict the layer file from the page cache (no root needed: its pages are not
        mapped), so the next reads come from the disk."""
        if self.file is not None:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.file is not None:
            os.close(self.fd)


def offload_layers(
    model: nn.Module,
    mode: str,
    device: torch.device,
    directory: str | Path | None = None,
    cold: bool = False,
) -> nn.Module:
    """Stream the decoder layers of `model` (model.model.layers) from host memory or disk."""
    if mode not in MODES:
        raise RecipeError(f"unknown offload {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return model
    if cold and mode != "disk":
        raise RecipeError(
            "offload_cold drops the layer file from the page cache: it needs offload=disk"
        )
    base = Path(directory) if directory else Path(tempfile.gettempdir())
    model.offload = LayerStreamer(model.model.layers, mode, device, base, cold)
    return model
