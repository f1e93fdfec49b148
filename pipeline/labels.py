"""Label sets: class names with the descriptors the prompt learner encodes (METHOD.md).

``--labels raer5|caer7|FILE``; FILE is YAML or JSON of the same shape as ``as_dict()``:
``{"name": ..., "classes": [{"name": ..., "descriptor": ..., "face_descriptor": ...}, ...]}``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import CaerError


class LabelSetError(CaerError):
    pass


@dataclass(frozen=True)
class LabelClass:
    name: str
    descriptor: str  # face and context, used when both streams are on
    face_descriptor: str  # used with --streams face


@dataclass(frozen=True)
class LabelSet:
    name: str
    classes: tuple[LabelClass, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def descriptors(self, streams: str = "both") -> list[str]:
        return [c.face_descriptor if streams == "face" else c.descriptor for c in self.classes]

    def index(self, label: str | int) -> int:
        """A class name (case-insensitive) or a 0-based index, as written in a CSV."""
        text = str(label).strip()
        lowered = [n.lower() for n in self.names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
        if text.lstrip("-").isdigit():
            i = int(text)
            if 0 <= i < len(self):
                return i
            raise LabelSetError(f"label {i} is out of range 0..{len(self) - 1} for label set "
                                f"'{self.name}'")
        raise LabelSetError(f"unknown label '{text}'; label set '{self.name}' has: "
                            f"{', '.join(self.names)}")

    def as_dict(self) -> dict:
        return {"name": self.name, "classes": [asdict(c) for c in self.classes]}

    @classmethod
    def from_dict(cls, data: dict, source: str = "label set") -> "LabelSet":
        try:
            classes = tuple(
                LabelClass(str(c["name"]), str(c["descriptor"]),
                           str(c.get("face_descriptor") or c["descriptor"]))
                for c in data["classes"])
            name = str(data.get("name", "custom"))
        except (KeyError, TypeError) as err:
            raise LabelSetError(f"{source}: expected {{name, classes: [{{name, descriptor, "
                                f"face_descriptor}}]}}; missing {err}") from None
        if len(classes) < 2:
            raise LabelSetError(f"{source}: a label set needs at least two classes")
        if len({c.name.lower() for c in classes}) != len(classes):
            raise LabelSetError(f"{source}: class names must be unique")
        return cls(name, classes)


# Exactly as the original code has them, missing spaces included: the released weights
# were trained with these strings.
RAER5 = LabelSet("raer5", (
    LabelClass("Neutrality",
               "Relaxed mouth,open eyes,neutral eyebrows,no noticeable emotional changes,engaged with study materials, or natural body posture.",
               "Relaxed mouth,open eyes,neutral eyebrows,smooth forehead,natural head position."),
    LabelClass("Enjoyment",
               "Upturned mouth corners,sparkling eyes,relaxed eyebrows,focused on course content,or occasionally nodding in agreement.",
               "Upturned mouth,sparkling or slightly squinted eyes,raised eyebrows,relaxed forehead."),
    LabelClass("Confusion",
               "Furrowed eyebrows, slightly open mouth, wandering or puzzled gaze, chin rests on the palm,or eyes lock on learning material.",
               "Furrowed eyebrows, slightly open mouth, squinting or narrowed eyes, tensed forehead."),
    LabelClass("Fatigue",
               "Mouth opens in a yawn, eyelids droop, head tilts forward, eyes lock on learning material, or hand writing.",
               "Mouth opens in a yawn, eyelids droop, head tilts forward."),
    LabelClass("Distraction",
               "Shifting eyes, restless or fidgety posture, relaxed but unfocused expression,frequently checking phone,or averted gaze from study materials.",
               "Averted gaze or looking away, restless or fidgety posture, shoulders shift restlessly."),
))

_CAER = [
    ("Surprise", "Widened eyes, an open mouth, raised eyebrows, and a frozen expression.",
     "Sudden stillness, widened eyes on the other person, hands raised or paused mid-motion."),
    ("Sad", "Tears, a downward-turned mouth, drooping upper eyelids, and a wrinkled forehead.",
     "Head down, avoiding eye contact, slow, withdrawn movements."),
    ("Neutral", "Relaxed facial muscles, a straight mouth, a smooth forehead, and unremarkable eyebrows.",
     "Relaxed posture, open stance, steady, calm eye contact."),
    ("Happy", "A smiling mouth, raised cheeks, wrinkled eyes, and arched eyebrows.",
     "Leaning in toward the other person, quick, cheerful movements."),
    ("Fear", "Raised eyebrows, parted lips, a furrowed brow, and a retracted chin.",
     "Hands close to chest or tightly together, small, cautious steps backward."),
    ("Disgust", "A wrinkled nose, lowered eyebrows, a tightened mouth, and narrow eyes.",
     "Slight step back, body angled away, hand raised or shielding face."),
    ("Anger", "Furrowed eyebrows, narrow eyes, tightened lips, and flared nostrils.",
     "Leaning forward, tense stance, fists clenched, or hand pointing."),
]
CAER7 = LabelSet("caer7", tuple(LabelClass(n, f"{face} {ctx}", face) for n, face, ctx in _CAER))

BUILTIN = {"raer5": RAER5, "caer7": CAER7}


def load_label_set(spec: str | dict) -> LabelSet:
    """``raer5``, ``caer7``, a YAML/JSON file, or a dict as stored in a fingerprint."""
    if isinstance(spec, dict):
        return LabelSet.from_dict(spec)
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.is_file():
        raise LabelSetError(f"--labels {spec}: not a built-in label set "
                            f"({', '.join(BUILTIN)}) and not a file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - any parse error becomes one line
        raise LabelSetError(f"--labels {spec}: cannot parse: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise LabelSetError(f"--labels {spec}: expected a mapping with 'classes'")
    return LabelSet.from_dict(data, source=str(spec))
