"""Label sets: class names with the descriptors the prompt learner encodes (METHOD.md).

``--labels NAME|FILE``: NAME one of ``BUILTIN`` (``python cli.py labels`` lists them), FILE
YAML or JSON of the same shape as ``as_dict()``:
``{"name": ..., "classes": [{"name": ..., "descriptor": ..., "face_descriptor": ...}, ...]}``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cache.core.errors import CaerError


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
        digits = text.removeprefix("-")
        if digits.isascii() and digits.isdigit() and len(digits) <= 18:  # int() takes these
            i = int(text)
            if 0 <= i < len(self):
                return i
            raise LabelSetError(f"label {i} is out of range 0..{len(self) - 1} for label set "
                                f"'{self.name}'")
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise LabelSetError(f"unknown label '{shown}'; label set '{self.name}' has: "
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

# --- DFEW, FERV39k, MAFW: face-aligned benchmarks, so every class gets a face-only sentence
# (caer7's face part for the basic emotions); the both-streams descriptor is the same sentence,
# since their usual releases are face crops with little context to describe.
_CAER_FACE = {name: face for name, face, _ in _CAER}


def _face_only(name: str, classes: list[tuple[str, str]]) -> LabelSet:
    return LabelSet(name, tuple(LabelClass(n, face, face) for n, face in classes))


# DFEW's README: 1 Happy, 2 Sad, 3 Neutral, 4 Angry, 5 Surprise, 6 Disgust, 7 Fear.
_BASIC7 = [("Happy", _CAER_FACE["Happy"]), ("Sad", _CAER_FACE["Sad"]),
           ("Neutral", _CAER_FACE["Neutral"]), ("Angry", _CAER_FACE["Anger"]),
           ("Surprise", _CAER_FACE["Surprise"]), ("Disgust", _CAER_FACE["Disgust"]),
           ("Fear", _CAER_FACE["Fear"])]
DFEW7 = _face_only("dfew7", _BASIC7)
# FERV39k's list files name the class; the index order is the one MAE-DFER and DFER-CLIP use.
FERV39K7 = _face_only("ferv39k7", _BASIC7)
# MAFW's paper lists its 11 single-label classes in this order.
MAFW11 = _face_only("mafw11", [
    ("Anger", _CAER_FACE["Anger"]), ("Disgust", _CAER_FACE["Disgust"]),
    ("Fear", _CAER_FACE["Fear"]), ("Happiness", _CAER_FACE["Happy"]),
    ("Neutral", _CAER_FACE["Neutral"]), ("Sadness", _CAER_FACE["Sad"]),
    ("Surprise", _CAER_FACE["Surprise"]),
    ("Contempt", "One corner of the mouth raised in a smirk, one eyebrow lifted, and eyes "
                 "looking down."),
    ("Anxiety", "A tense forehead, darting eyes, lips pressed tight or bitten, and a strained "
                "face."),
    ("Helplessness", "Inner eyebrows raised, a lowered gaze, a slack mouth, and a resigned "
                     "face."),
    ("Disappointment", "Mouth corners turned down, lowered eyebrows and eyelids, and a "
                       "deflated face."),
])

# --- DAiSEE: one student in front of a laptop webcam, four levels per affective state
# (DAiSEE's "very low, low, high, very high", 0-3 in its label files). Written by us in the
# paper's manner: a facial part, then a context part.
DAISEE_LEVELS = ("Very low", "Low", "High", "Very high")
_DAISEE = {
    "engagement": [
        ("Eyes closed or turned away from the screen, a slack face, and a drooping head.",
         "Slumped back or turned away from the laptop, busy with something else, or leaving "
         "the frame."),
        ("Half-open eyes, a blank expression, and a gaze that drifts off the screen.",
         "Leaning back in the chair, chin on a hand, glancing around the room."),
        ("Open eyes on the screen, a relaxed mouth, and a calm, attentive face.",
         "Sitting upright facing the laptop, head still, watching the lesson."),
        ("Wide-open eyes fixed on the screen, raised eyebrows, and a focused, alert face.",
         "Leaning toward the laptop, nodding along or taking notes, eyes following the lesson."),
    ],
    "boredom": [
        ("Alert eyes on the screen, a lively face, and no yawning.",
         "Sitting upright and still, attention held by the lesson."),
        ("Mostly steady eyes, a neutral mouth, and an occasional blink or sigh.",
         "Upright but shifting now and then, still facing the screen."),
        ("Drooping eyelids, a flat expression, and a pressed or yawning mouth.",
         "Chin propped on a hand, slouching, glancing away from the screen."),
        ("Heavy eyelids, repeated yawns, and a vacant, expressionless stare.",
         "Slumped low in the chair, head on a hand or the desk, fidgeting or looking elsewhere."),
    ],
    "confusion": [
        ("A smooth brow, relaxed eyes, and a calm mouth.",
         "Watching the screen steadily, posture relaxed."),
        ("A slight frown, briefly narrowed eyes, and lips slightly pressed.",
         "Pausing, leaning a little closer to the screen."),
        ("Furrowed eyebrows, squinting eyes, and a slightly open or twisted mouth.",
         "Head tilted, leaning in toward the screen, touching the chin or face."),
        ("Deeply knitted brows, narrowed eyes, and a puzzled, tense face.",
         "Head tilted or shaking, scratching the head, leaning close to reread the screen."),
    ],
    "frustration": [
        ("A relaxed brow, calm eyes, and a soft mouth.",
         "Sitting still and at ease in front of the laptop."),
        ("Slightly tightened lips and a brief frown.",
         "A small sigh, shifting in the seat."),
        ("Lowered, drawn-together brows, pressed lips, and a tense jaw.",
         "Sighing, rubbing the face, restless hands near the keyboard."),
        ("A scowl, a clenched jaw, tightly pressed lips, and glaring eyes.",
         "Throwing the head back, hands on the head or face, pushing away from the laptop."),
    ],
}
DAISEE = {target: LabelSet(f"daisee-{target}4", tuple(
    LabelClass(level, f"{face} {ctx}", face) for level, (face, ctx) in zip(DAISEE_LEVELS, rows)))
    for target, rows in _DAISEE.items()}

BUILTIN = {"raer5": RAER5, "caer7": CAER7, "dfew7": DFEW7, "ferv39k7": FERV39K7,
           "mafw11": MAFW11, **{ls.name: ls for ls in DAISEE.values()}}

# What each built-in set is for, shown by `python cli.py labels`.
ABOUT = {
    "raer5": "RAER (CLIP-CAER's own dataset); the original code's strings, missing spaces included",
    "caer7": "CAER (7 emotions in TV scenes), in the original code's class order",
    "dfew7": "DFEW, in DFEW's label order 1-7; caer7's face sentences",
    "ferv39k7": "FERV39k, in the order MAE-DFER and DFER-CLIP use; caer7's face sentences",
    "mafw11": "MAFW's 11 single-label classes, in the MAFW paper's order",
    **{ls.name: f"DAiSEE {t}, levels 0-3 of its label files" for t, ls in DAISEE.items()},
}


def load_label_set(spec: str | dict) -> LabelSet:
    """A built-in name (``BUILTIN``), a YAML/JSON file, or a dict as stored in a fingerprint."""
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


def format_label_set(labels: LabelSet, about: str = "") -> str:
    """A label set as `python cli.py labels` prints it: classes in order, with descriptors."""
    import textwrap

    head = f"{labels.name}: {len(labels)} classes" + (f" ({about})" if about else "")
    lines = [head]
    for i, c in enumerate(labels.classes):
        lines.append(f"  {i} {c.name}")
        shown = [("both", c.descriptor)] + ([("face", c.face_descriptor)]
                                            if c.face_descriptor != c.descriptor else [])
        for stream, text in shown:
            lines += textwrap.wrap(text, 96, initial_indent=f"      {stream}: ",
                                   subsequent_indent=" " * 12)
    return "\n".join(lines)
