"""The online demo: short factual questions asked for a JSON answer, and the checker that labels
the samples. SmolLM2-135M-Instruct opens with prose, Markdown or a JSON object of other keys most
of the time (measured before choosing it: about 1 sample in 9 passes at temperature 0.7, so every
round has both labels) but can learn it, which makes the held-out pass rate over the rounds a
visible learning curve.
"""

import json
import os
import random

from pipeline.cache import publish_file
from pipeline.data.demo import qa_pairs

INSTRUCTION = ' Answer with a JSON object of the form {"answer": ...}.'


def json_answer(prompt, completion: str) -> bool:
    """Passes when the completion, leading spaces aside, opens with a JSON object that has an
    "answer" key (what follows the object is not judged)."""
    try:
        value, _ = json.JSONDecoder().raw_decode(completion.lstrip())
    except ValueError:
        return False
    return isinstance(value, dict) and "answer" in value


def ensure_demo_prompts(path: str, seed: int = 0) -> None:
    """Write the demo's prompt set (JSON lines, one user turn each) unless it exists."""
    if os.path.exists(path):
        return
    questions = [question for question, _ in qa_pairs()]
    random.Random(seed).shuffle(questions)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = "".join(json.dumps({"prompt": [{"role": "user", "content": q + INSTRUCTION}]}) + "\n" for q in questions)
    publish_file(path, lambda file: file.write(rows.encode()))
