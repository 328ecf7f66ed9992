"""The channel set of a model: CT, PET and, when the cohort has labels, one channel per organ-label group.

Labels are generated jointly with the images as a **one-hot** code: a volume of group indices g ∈ {0..K}
(0 = background, everything not in a group) becomes K + 1 channels in [0, 1] with a 1 in channel g,
standardized like the image channels with fixed constants (mean 0.5, SD 0.5: ±σ_data in network units).
Decoding is the argmax over the label channels — the nearest code word in Euclidean distance, so clean
codes round-trip exactly and noisy ones decode to the nearest class.  Why one-hot and not analog bits
(⌈log2(K + 1)⌉ channels): the extra channels touch only the UNet's first and last convolutions (under 1 %
of the paper network's FLOPs for 11 groups), every class is equally far from every other (with bits, liver
and bladder can be one flipped bit apart, so an undecided voxel jumps between unrelated organs), and a
blurred organ edge decodes to one of its two neighbouring classes, never to a third.

A group is written to ``labels/`` as the TotalSegmentator 'total' id of its first member (``lungs`` as
``lung_upper_lobe_left``); the record stored in each checkpoint lists every group with its members and
written id, and generation refuses a label set the checkpoint was not trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .labels import label_id, total_class_map

LUNG_LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
              "lung_lower_lobe_right")


def _bones() -> tuple[str, ...]:
    names = ["sacrum", "sternum", "costal_cartilages", "skull"]
    names += [f"vertebrae_{p}{k}" for p, n in (("C", 7), ("T", 12), ("L", 5)) for k in range(1, n + 1)]
    names += ["vertebrae_S1"] + [f"rib_{side}_{k}" for side in ("left", "right") for k in range(1, 13)]
    names += [f"{bone}_{side}" for bone in ("humerus", "scapula", "clavicula", "femur", "hip")
              for side in ("left", "right")]
    return tuple(names)


# The default groups of issue 14: the organs of the paper's table and the structures a reader checks first.
DEFAULT_LABEL_GROUPS: dict[str, tuple[str, ...]] = {
    "liver": ("liver",), "spleen": ("spleen",), "kidney_left": ("kidney_left",),
    "kidney_right": ("kidney_right",), "heart": ("heart",), "lungs": LUNG_LOBES,
    "urinary_bladder": ("urinary_bladder",), "stomach": ("stomach",), "aorta": ("aorta",), "bone": _bones(),
}

LABEL_MEAN, LABEL_STD = 0.5, 0.5        # one-hot [0, 1] ↔ ±σ_data in network units


class ChannelError(ValueError):
    """A label set that cannot be used (unknown class, a class in two groups, a checkpoint mismatch)."""


@dataclass(frozen=True)
class ChannelSet:
    """CT and PET, plus ``groups`` (name → TotalSegmentator 'total' class names) as one-hot label channels.

    No groups = the two-channel model.  Channel order: ct, pet, label:background, label:<group>...
    """

    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @staticmethod
    def from_groups(groups: dict[str, list[str] | tuple[str, ...]] | None) -> ChannelSet:
        """Validate a {group: [class names]} mapping (None or {} = images only) against the installed class map."""
        if not groups:
            return ChannelSet()
        seen: dict[str, str] = {}
        out = []
        for name, members in groups.items():
            if name in ("background", "ct", "pet") or not str(name).strip():
                raise ChannelError(f"label group name {name!r} is reserved or empty")
            members = tuple(members) if not isinstance(members, str) else (members,)
            if not members:
                raise ChannelError(f"label group {name!r} has no member classes")
            for m in members:
                try:
                    label_id(m)
                except KeyError:
                    raise ChannelError(f"label group {name!r}: {m!r} is not a TotalSegmentator 'total' class "
                                       "of the installed version") from None
                if m in seen:
                    raise ChannelError(f"class {m!r} is in two label groups ({seen[m]!r} and {name!r})")
                seen[m] = name
            out.append((str(name), members))
        return ChannelSet(tuple(out))

    @property
    def has_labels(self) -> bool:
        return bool(self.groups)

    @property
    def n_classes(self) -> int:
        """Label classes including background (0 without labels)."""
        return len(self.groups) + 1 if self.groups else 0

    @property
    def count(self) -> int:
        return 2 + self.n_classes

    @property
    def names(self) -> list[str]:
        labels = ["label:background"] + [f"label:{g}" for g, _ in self.groups] if self.groups else []
        return ["ct", "pet"] + labels

    @property
    def image(self) -> slice:
        return slice(0, 2)

    @property
    def labels(self) -> slice:
        return slice(2, self.count)

    def loss_weights(self, label_weight: float) -> list[float] | None:
        """Per-channel weights of the training loss: 1 for CT and PET, ``label_weight`` shared equally by the
        label channels (so K + 1 one-hot channels together count like ``label_weight`` image channels instead of
        outvoting the two images K + 1 : 2); None without labels (a plain mean)."""
        if not self.has_labels:
            return None
        k = self.n_classes
        return [1.0, 1.0] + [label_weight / k] * k

    def full_stats(self, image_mean: list[float], image_std: list[float]) -> tuple[list[float], list[float]]:
        """Per-channel standardization constants: the measured CT / PET ones, then the fixed label ones."""
        k = self.n_classes
        return list(image_mean)[:2] + [LABEL_MEAN] * k, list(image_std)[:2] + [LABEL_STD] * k

    def written_ids(self) -> list[int]:
        """The 'total' id each group index is written as (index 0, background, is 0)."""
        return [0] + [label_id(members[0]) for _, members in self.groups]

    def lookup(self) -> np.ndarray:
        """(256,) uint8: TotalSegmentator 'total' id → group index (0 for every id outside the groups)."""
        table = np.zeros(256, np.uint8)
        for k, (_, members) in enumerate(self.groups, start=1):
            for m in members:
                table[label_id(m)] = k
        return table

    def group_volume(self, total_ids: np.ndarray) -> np.ndarray:
        """A label volume of 'total' ids (any integer dtype) → group indices (uint8, same shape)."""
        ids = np.asarray(total_ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ChannelError(f"label ids must lie in 0..255, got {ids.min()}..{ids.max()}")
        return self.lookup()[ids.astype(np.int64)]

    def to_total_ids(self, groups: np.ndarray) -> np.ndarray:
        """Group indices → uint8 'total' ids as written to ``labels/``."""
        return np.asarray(self.written_ids(), np.uint8)[np.asarray(groups, np.int64)]

    def one_hot(self, groups: torch.Tensor) -> torch.Tensor:
        """Group indices (..., X, Y, Z) integer → one-hot (..., K + 1, X, Y, Z) float32 in {0, 1}."""
        g = groups.long()
        if g.numel() and int(g.max()) >= self.n_classes:
            raise ChannelError(f"group index {int(g.max())} outside the {self.n_classes} classes")
        return torch.movedim(torch.nn.functional.one_hot(g, self.n_classes), -1, -4).float()

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """Label channels (..., K + 1, X, Y, Z) in any affine scale shared by the channels → group indices
        (uint8): the argmax, i.e. the nearest one-hot code word (ties: the lower index)."""
        if u.shape[-4] != self.n_classes:
            raise ChannelError(f"expected {self.n_classes} label channels, got {u.shape[-4]}")
        return u.argmax(dim=-4).to(torch.uint8)

    def record(self) -> dict:
        """What a checkpoint stores: channel names and, with labels, the groups (members, written id) and the
        encoding.  A CT + PET model records its two channel names only, as checkpoints always have."""
        if not self.groups:
            return {"channels": self.names}
        return {"channels": self.names,
                "label_groups": [{"name": g, "members": list(m), "written_id": label_id(m[0])}
                                 for g, m in self.groups],
                "label_encoding": "one-hot, [0, 1] standardized with mean 0.5, SD 0.5; decoded by argmax"}

    @staticmethod
    def from_record(norm: dict) -> ChannelSet:
        """The channel set of a checkpoint's normalization record (records without label groups: images only).

        Refuses a record whose member classes the installed TotalSegmentator does not know."""
        groups = norm.get("label_groups") or []
        out = ChannelSet.from_groups({g["name"]: g["members"] for g in groups})
        for g in groups:
            if label_id(g["members"][0]) != int(g["written_id"]):
                raise ChannelError(f"label group {g['name']!r} was written as id {g['written_id']} by the "
                                   f"TotalSegmentator the model was trained with; the installed version maps "
                                   f"{g['members'][0]!r} to {label_id(g['members'][0])}")
        return out


def check_same_channels(record: dict, channels: ChannelSet, where: str) -> None:
    """Refuse weights (``record``: their normalization) trained on another channel set than ``channels``."""
    theirs = ChannelSet.from_record(record)
    if theirs != channels:
        raise ChannelError(f"{where}: these weights were trained on the channels {theirs.names}; the config asks for "
                           f"{channels.names} (data.labels of the low-res preset)")


def check_total_ids(volume: np.ndarray, where: str) -> None:
    """Refuse a label volume holding ids the installed 'total' class map does not have."""
    known = set(total_class_map().values()) | {0}
    bad = sorted(set(np.unique(volume).tolist()) - known)
    if bad:
        raise ChannelError(f"{where}: label ids {bad[:5]} are not TotalSegmentator 'total' classes")
