#!/usr/bin/env python3
"""Reference sentence vectors for the MiniLM encoder, produced by the sentence-transformers package.

    python3 scripts/minilm_reference.py MODEL_DIR OUT.json

MODEL_DIR is the catalog's minilm-l6 directory (the sentence-transformers layout: modules.json,
1_Pooling, model.safetensors, tokenizer.json). The packages (torch, sentence-transformers,
transformers) are pinned and installed into their own virtual environment under
$PORTEIRO_HOME/st-venv on first use, so the test machine's Python is left alone. The model is
read from MODEL_DIR only: nothing is looked up online.

The sentences cover short and long text (past the 256-token window, so truncation is checked),
Portuguese with accents, code, numbers and the kinds of prompts the router sees.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

PINS = ["torch==2.5.1", "sentence-transformers==3.3.1", "transformers==4.46.3"]

SENTENCES = [
    "A cat is sitting on the mat.",
    "A kitten rests on a rug.",
    "The stock market fell sharply on Tuesday.",
    "Please send me the invoice for March.",
    "Could you email the March bill?",
    "Format this as JSON: name Alice, age 30, city Lisbon.",
    "Extract the order number and the delivery date from this e-mail.",
    "Summarise the following paragraph in one sentence.",
    "Classify the sentiment of this review: the battery died after two days.",
    "Prove that there are infinitely many prime numbers.",
    "Design a distributed rate limiter for a global API and explain the trade-offs.",
    "Write a long essay on the causes of the First World War.",
    "Qual é a capital de Portugal e quantos habitantes tem?",
    "Meu pedido não chegou; preciso de ajuda com a devolução, por favor.",
    "A cidade de São Paulo é conhecida por sua gastronomia diversificada.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;",
    "What is 17 * 23 + 4?",
    "Translate to French: where is the train station?",
    "ok",
    "URGENT!!! Call me back at +1 (555) 010-9999 before 5pm.",
    "The mitochondria is the powerhouse of the cell.",
    "   leading and trailing spaces   ",
    "MIXED Case Words With Ünïcödé and emojis 🚀🔥",
    # Longer than the 256-token window: both sides must truncate the same way.
    " ".join(
        f"Sentence number {i} talks about routing requests between small local models "
        "and large hosted models, with privacy and cost in mind."
        for i in range(30)
    ),
    "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric "
    "effect, Brownian motion, special relativity and the equivalence of mass and energy. "
    "Each of them would have been enough for a lasting reputation.",
]


def ensure_venv() -> None:
    """Re-runs this script inside the pinned environment unless it already is that environment."""
    try:
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401

        return
    except ImportError:
        pass
    if os.environ.get("PORTEIRO_ST_VENV_ACTIVE") == "1":
        sys.exit("minilm_reference: the pinned environment lacks sentence-transformers")
    home = Path(os.environ.get("PORTEIRO_HOME", Path.home() / ".cache" / "porteiro"))
    venv = home / "st-venv"
    py = venv / "bin" / "python"
    marker = venv / ".pins"
    if not (py.exists() and marker.exists() and marker.read_text() == "\n".join(PINS)):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PINS],
            check=True,
        )
        marker.write_text("\n".join(PINS))
    env = dict(os.environ, PORTEIRO_ST_VENV_ACTIVE="1")
    os.execve(str(py), [str(py), *sys.argv], env)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    if not (model_dir / "modules.json").exists():
        sys.exit(f"minilm_reference: {model_dir} is not a sentence-transformers model directory")
    ensure_venv()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=True)
    lengths = [len(model.tokenize([s])["input_ids"][0]) for s in SENTENCES]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "producer": f"sentence-transformers {sentence_transformers.__version__}, "
                f"torch {torch.__version__}",
                "max_seq_length": model.max_seq_length,
                "sentences": SENTENCES,
                "tokens": lengths,
                "vectors": [[float(x) for x in v] for v in vectors],
            }
        )
    )
    tmp.replace(out)
    print(out)


if __name__ == "__main__":
    main()
