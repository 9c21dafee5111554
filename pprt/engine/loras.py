"""LoraRegistry: the driver's view of the LoRA adapter slots (names and slot ids, no tensors).

Every stage holds the same `max_loras` slots (pprt.models.lora.LoraBank). The
registry gives a name a free slot when it is loaded and queues the change; the
scheduler attaches queued changes to the next step plan, so every stage fills or
empties the slot before running that step's tokens, in step order (a request
of an adapter can never overtake its loading). Used only on the engine loop's
thread. Knows nothing of files (pprt.weights.lora checks them first).
"""

from __future__ import annotations

from ..distributed.step import LoraChange
from ..weights.lora import LoraAdapter


class LoraRegistry:
    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self._slots: dict[str, int] = {}  # name -> slot
        self._loads: dict[str, int] = {}  # name -> which load this is (a name reloaded is another adapter)
        self._count = 0
        self._pending: list[LoraChange] = []

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def slot_of(self, name: str | None) -> int:
        """The slot of adapter `name` (-1 for None). Raises ValueError for an unknown name."""
        if name is None:
            return -1
        if name not in self._slots:
            known = ", ".join(map(repr, self._slots)) or "none loaded"
            raise ValueError(f"no LoRA adapter named {name!r} ({known}): load it with LLM.load_lora first")
        return self._slots[name]

    def cache_key(self, name: str | None) -> bytes:
        """What the prefix cache adds to the root of a request's hash chain: KV computed under one
        load of an adapter is reused only by requests of that same load (b"" for no adapter).
        Raises ValueError for an unknown name."""
        if name is None:
            return b""
        self.slot_of(name)
        return f"lora {self._loads[name]} {name}".encode()

    def add(self, adapter: LoraAdapter) -> int:
        """Give `adapter` a free slot (queued for the stages). Raises ValueError when its name is
        taken or every slot is used."""
        if adapter.name in self._slots:
            raise ValueError(f"a LoRA adapter named {adapter.name!r} is already loaded (unload_lora it first)")
        free = sorted(set(range(self.max_loras)) - set(self._slots.values()))
        if not free:
            raise ValueError(f"all {self.max_loras} LoRA slots are in use ({', '.join(self._slots)}): "
                             "unload one or raise max_loras")
        self._slots[adapter.name] = free[0]
        self._count += 1
        self._loads[adapter.name] = self._count
        self._pending.append(LoraChange(free[0], adapter))
        return free[0]

    def remove(self, name: str) -> None:
        slot = self.slot_of(name)
        del self._slots[name], self._loads[name]
        self._pending.append(LoraChange(slot, None))

    def take_changes(self) -> list[LoraChange]:
        changes, self._pending = self._pending, []
        return changes

    def requeue(self, changes: list[LoraChange]) -> None:
        """Changes of a plan that never reached the stages: sent again, before newer ones."""
        self._pending[:0] = changes
