"""How a model's layers share the paged KV pool: one block table per group of layers (the hybrid layout of
vLLM's KV cache manager, for models with both windowed and global layers).

A model whose layers all attend to every position, or all through a window, has one group: a block holds every
layer's K/V of `block_size` tokens and a sequence has one block table. A model with both kinds (Gemma 2 and 3,
Qwen with `max_window_layers`) splits its layers into groups of `group_size` layers of one kind; the pool's layer
dimension is `group_size` and a block holds that many layers' K/V of one group only. A sequence has a table per
group, all drawn from one free list: the windowed groups give back their blocks behind the window (each token's
KV there costs only its global groups' blocks), the global groups keep every block.

Invariants: every model layer has one (group, slot) and no two layers share one; a group holds layers of one kind:
window 0 (every position) or windowed, and every windowed group allocates for one window, the widest of the
model's (a narrower layer just reads less of it); group 0 is a global group in a hybrid layout.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_GROUPS = 8  # more groups pad fewer slots but cost a table (and an allocation) each per sequence


@dataclass(frozen=True)
class KVGroups:
    group_size: int  # layers per group: the pool's layer dimension
    windows: tuple[int, ...]  # per group: the window its blocks are allocated for (0: every position)
    placement: tuple[tuple[int, int], ...]  # per model layer: (group, slot)

    @staticmethod
    def single(num_layers: int, window: int = 0) -> KVGroups:
        """Every layer in one group: a block holds all of them (`window` > 0: every layer has one)."""
        return KVGroups(num_layers, (window,), tuple((0, layer) for layer in range(num_layers)))

    @staticmethod
    def of(num_layers: int, sliding_windows: tuple[int, ...], hybrid: bool) -> KVGroups:
        """The layout of a model with these per-layer windows; `hybrid` False keeps one group whatever they are."""
        windowed = [layer for layer, w in enumerate(sliding_windows) if w > 0]
        if not windowed or len(windowed) == num_layers:
            return KVGroups.single(num_layers, max(sliding_windows) if windowed else 0)
        if not hybrid:
            return KVGroups.single(num_layers)
        windowed_set = set(windowed)
        full = [layer for layer in range(num_layers) if layer not in windowed_set]
        size = _group_size(len(full), len(windowed))
        window = max(sliding_windows)
        windows: list[int] = []
        placement: dict[int, tuple[int, int]] = {}
        for layers, group_window in ((full, 0), (windowed, window)):
            for start in range(0, len(layers), size):
                for slot, layer in enumerate(layers[start:start + size]):
                    placement[layer] = (len(windows), slot)
                windows.append(group_window)
        return KVGroups(size, tuple(windows), tuple(placement[layer] for layer in range(num_layers)))

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def is_hybrid(self) -> bool:
        return self.num_groups > 1

    @property
    def window(self) -> int:
        """The window of the windowed groups (0: none has one)."""
        return max(self.windows)

    def slot_windows(self, group: int, sliding_windows: tuple[int, ...]) -> tuple[int, ...]:
        """Per slot of `group`, the window of the layer there (the group's for a slot no layer fills)."""
        out = [self.windows[group]] * self.group_size
        for layer, (g, slot) in enumerate(self.placement):
            if g == group and sliding_windows:
                out[slot] = sliding_windows[layer]
        return tuple(out)

    def describe(self) -> str:
        """What two engines exchanging KV must agree on (kv_transfer.kv_layout): "" for one group."""
        if not self.is_hybrid:
            return ""
        return f"size {self.group_size}, windows {list(self.windows)}, placement {[list(p) for p in self.placement]}"

    def padded_slots(self, group: int) -> list[int]:
        """The slots of `group` no layer fills (their pages are never written)."""
        filled = {slot for g, slot in self.placement if g == group}
        return [slot for slot in range(self.group_size) if slot not in filled]

    def layers_by_group(self, layers: list[int]) -> dict[int, list[int]]:
        """Model layers `layers` as their slots, per group (in the order given)."""
        out: dict[int, list[int]] = {}
        for layer in layers:
            group, slot = self.placement[layer]
            out.setdefault(group, []).append(slot)
        return out

    @property
    def num_padded_slots(self) -> int:
        return self.num_groups * self.group_size - len(self.placement)


def _group_size(num_full: int, num_windowed: int) -> int:
    """The layers per group that pads the fewest global slots (each costs memory for every token of a context),
    then the fewest slots (a windowed one costs it within the window only), in at most MAX_GROUPS groups; ties:
    fewer groups."""
    def cost(size: int) -> tuple[int, int, int]:
        full, windowed = -(-num_full // size), -(-num_windowed // size)
        return full * size - num_full, (full + windowed) * size, full + windowed

    sizes = [s for s in range(1, max(num_full, num_windowed) + 1) if cost(s)[2] <= MAX_GROUPS]
    return min(sizes, key=cost)
