"""Chat templates rendered by Hugging Face transformers (the reference renderer) for a
table of conversations. Run by scripts/make-fixtures; writes tests/fixtures/templates/.

Templates: the ones inside the real GGUF files from scripts/fetch-test-models, and the
DeepSeek-R1-style template of lifeboat's tiny test model (read from `make-tiny` output).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import transformers
from transformers.utils.chat_template_utils import render_jinja_template

sys.path.insert(0, str(Path(__file__).parent))
from gguf_header import HeaderReader  # noqa: E402

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}

CONVERSATIONS = {
    "single_user": {"messages": [{"role": "user", "content": "Hello!"}]},
    "system_and_user": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime."},
        ]
    },
    "multi_turn": {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And times 3?"},
        ]
    },
    "prior_reasoning": {
        "messages": [
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "<think>\nIt has no divisors but 1 and 7.\n</think>\n\nYes."},
            {"role": "user", "content": "And 9?"},
        ]
    },
    "tool_call_and_result": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
        ],
        "tools": [WEATHER_TOOL],
    },
    "tools_offered": {
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER_TOOL],
    },
    "unicode_and_newlines": {
        "messages": [
            {"role": "system", "content": "Réponds en français.\n\nSois bref."},
            {"role": "user", "content": "東京は？ 🚀\n  indented\n"},
        ]
    },
}


def gguf_template(path: Path) -> dict:
    reader = HeaderReader(path)
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()

    def token(key):
        return tokens[fields[key].contents()] if key in fields else ""

    return {
        "template": fields["tokenizer.chat_template"].contents(),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
    }


def tiny_template(lifeboat: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([lifeboat, "model", "make-tiny", "--out", out], check=True, capture_output=True)
        config = json.loads((Path(out) / "tokenizer_config.json").read_text())
    return {
        "template": config["chat_template"],
        "bos_token": config["bos_token"],
        "eos_token": config["eos_token"],
    }


def main() -> None:
    models_dir, out_dir, lifeboat = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {
        "deepseek-r1-distill-qwen": ("DeepSeek-R1-Distill-Qwen-7B.header.gguf", None),
        "qwen2.5-coder": ("qwen2.5-coder-0.5b-instruct.gguf", None),
        "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", None),
        "tiny-r1": (None, tiny_template(lifeboat)),
    }
    for name, (file, spec) in sources.items():
        spec = spec or gguf_template(models_dir / file)
        cases = []
        for case_name, conversation in CONVERSATIONS.items():
            case = {"name": case_name, **conversation}
            try:
                rendered, _ = render_jinja_template(
                    conversations=[conversation["messages"]],
                    tools=conversation.get("tools"),
                    chat_template=spec["template"],
                    add_generation_prompt=True,
                    bos_token=spec["bos_token"],
                    eos_token=spec["eos_token"],
                )
                case["rendered"] = rendered[0]
            except Exception as err:  # the template itself refuses this conversation
                case["error"] = str(err)
            cases.append(case)
        fixture = {
            "model": file,
            "reference": f"transformers {transformers.__version__} render_jinja_template",
            "cases": cases,
        }
        target = out_dir / f"{name}.json"
        target.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
        print(f"wrote {target} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
