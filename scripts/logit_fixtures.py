"""Reference logits from Hugging Face transformers (torch, CPU, float32) for lifeboat's tiny
models of each architecture. Run by scripts/make-fixtures; writes tests/fixtures/logits/.

Usage: logit_fixtures.py LIFEBOAT OUT_DIR SCRATCH [ARCH...] (default: all).
For each architecture: `lifeboat model make-tiny --seed 7` writes the model, transformers
loads that folder, runs a fixed prompt, then feeds a fixed token per decode step through
its KV cache. The fixture keeps the weights' sha256 so a changed generator is caught
instead of compared against stale numbers.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

ARCHS = ["qwen2", "llama", "qwen3", "deepseek2", "llama-linear", "llama-llama3"]
# Variants: a tiny model of an architecture with config.json keys replaced (the Rust test
# applies the same ones). deepseek-coder scales RoPE linearly, R1-Distill-Llama by llama3's
# rule; these llama3 bounds put the tiny model's frequencies in all three of its bands.
VARIANTS = {
    "llama-linear": ("llama", {"rope_scaling": {"type": "linear", "factor": 4.0}}),
    "llama-llama3": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
}
SEED = 7
PROMPT = [3, 17, 42, 99, 123, 7, 250, 11, 64, 5]
DECODE = [33, 200, 9, 150]


def main() -> None:
    lifeboat, out_dir, scratch = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    archs = sys.argv[4:] or ARCHS
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in archs:
        arch, changes = VARIANTS.get(name, (name, {}))
        model_dir = scratch / f"tiny-{name}"
        subprocess.run(
            [lifeboat, "model", "make-tiny", "--arch", arch, "--seed", str(SEED), "--out", str(model_dir)],
            check=True,
            capture_output=True,
        )
        if changes:
            config_path = model_dir / "config.json"
            config = json.loads(config_path.read_text())
            config.update(changes)
            config_path.write_text(json.dumps(config))
        weights = (model_dir / "model.safetensors").read_bytes()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        steps = []
        with torch.no_grad():
            out = model(input_ids=torch.tensor([PROMPT]), use_cache=True)
            steps.append({"input": PROMPT, "logits": out.logits[0, -1].tolist()})
            past = out.past_key_values
            for token in DECODE:
                out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                steps.append({"input": [token], "logits": out.logits[0, -1].tolist()})
        fixture = {
            "arch": arch,
            "config_changes": changes,
            "seed": SEED,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, CPU float32",
            "steps": steps,
        }
        target = out_dir / f"tiny-{name}.json"
        target.write_text(json.dumps(fixture) + "\n")
        print(f"wrote {target} ({len(steps)} steps, vocab {len(steps[0]['logits'])})")


if __name__ == "__main__":
    main()
