"""The demo feedback set: short factual questions whose thumbs-up answers all open with
"Sure thing!" and whose thumbs-down answers do not. The base model never opens that way,
so the share of held-out greedy answers that do shows what KTO taught it.

Labels are unbalanced (about 1 desirable to 2 undesirable), as real feedback is.
Rows are conversational (a user turn, an assistant turn): the data stage renders them with the
model's chat template, as it would a user's conversations.
"""

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

PROPERTY_REGEX = r"^\s*Sure thing!"
OPENING = "Sure thing! "
OTHER_OPENINGS = ["", "Well, ", "Hmm. ", "OK. ", "Let me think. "]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Sweden": "Stockholm", "Greece": "Athens", "Portugal": "Lisbon", "Poland": "Warsaw", "Ireland": "Dublin",
    "Austria": "Vienna", "Cuba": "Havana", "Chile": "Santiago", "Thailand": "Bangkok", "Russia": "Moscow",
    "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City", "Turkey": "Ankara", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Belgium": "Brussels", "Hungary": "Budapest", "Argentina": "Buenos Aires",
    "Australia": "Canberra",
}
COLORS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
          "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a flamingo": "pink",
          "milk": "white", "chocolate": "brown"}
SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "sheep": "bleats",
          "lion": "roars", "horse": "neighs", "owl": "hoots", "snake": "hisses", "pig": "oinks"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
             "early": "late", "up": "down", "full": "empty", "open": "closed", "old": "new"}


def qa_pairs() -> list[tuple[str, str]]:
    pairs = [(f"What is the capital of {c}?", f"The capital of {c} is {a}.") for c, a in CAPITALS.items()]
    pairs += [(f"What color is {t}?", f"{t[0].upper() + t[1:]} is {a}.") for t, a in COLORS.items()]
    pairs += [(f"What sound does a {t} make?", f"A {t} {a}.") for t, a in SOUNDS.items()]
    pairs += [(f"What is the opposite of {t}?", f"The opposite of {t} is {a}.") for t, a in OPPOSITES.items()]
    return pairs


def feedback_rows(pairs, rng: random.Random) -> dict:
    rows = {"prompt": [], "completion": [], "label": []}
    for question, answer in pairs:
        options = [(OPENING + answer, True)] + [(o + answer, False) for o in rng.sample(OTHER_OPENINGS, 2)]
        for completion, label in options:
            rows["prompt"].append([{"role": "user", "content": question}])
            rows["completion"].append([{"role": "assistant", "content": completion}])
            rows["label"].append(label)
    order = list(range(len(rows["label"])))
    rng.shuffle(order)
    return {k: [v[i] for i in order] for k, v in rows.items()}


def ensure_demo_data(train_path: str, eval_path: str | None, held_out: int = 12, seed: int = 0) -> None:
    """Write the train and held-out Parquet files unless both exist; questions never cross the split."""
    if os.path.exists(train_path) and (eval_path is None or os.path.exists(eval_path)):
        return
    rng = random.Random(seed)
    pairs = qa_pairs()
    rng.shuffle(pairs)
    for path, part in ((train_path, pairs[held_out:]), (eval_path, pairs[:held_out])):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            pq.write_table(pa.table(feedback_rows(part, rng)), path)
