"""Reference token ids from llama.cpp (llama-cpp-python, vocab_only) for lifeboat's GGUF
tokenizer tests. Run by scripts/make-fixtures; writes tests/fixtures/tokenizer/<name>.json.

The DeepSeek-R1-Distill-Qwen-7B file is only the first chunk of a GGUF (its tensors are cut
off), which llama.cpp refuses to open; its metadata is copied into a vocab-only GGUF first,
the same kind of file llama.cpp's own tokenizer tests use.
"""

import hashlib
import json
import sys
from pathlib import Path

import gguf
import llama_cpp

sys.path.insert(0, str(Path(__file__).parent))
from gguf_header import HeaderReader  # noqa: E402

# What the acceptance asks for: ASCII, CJK, emoji, code, digits, whitespace runs, special
# tokens, plus the places where pre-tokenizers disagree (contractions, punctuation runs,
# newlines next to text, fullwidth forms, combining marks).
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we'd've DONE'S",
    "1234567890 3.14159 -42 1,000,000 2024-11-22",
    "東京は日本の首都です。北京是中国的首都。",
    "서울은 한국의 수도입니다.",
    "Emoji: 🚀🌍✨ 👨‍👩‍👧‍👦 🇯🇵",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))",
    "fn main() {\n\tlet x: Vec<u8> = vec![0xFF; 16];\n}",
    "    leading spaces and trailing   ",
    "a\n\nb\r\nc \n d\t\te",
    "multiple     spaces\n\n\n\nand newlines",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<｜User｜>What is 2+2?<｜Assistant｜><think>\nFour.\n</think>\n\n4",
    "<think>reasoning</think>answer",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ！？ and ‘quotes’ “double”",
    "Ünïcödé ñ café naïve Ελληνικά русский",
    "e\u0301 combining marks a\u0308",
    "!!!??? ... --- *** ### $$$",
    "x==y&&z!=w||q>=r",
    "https://example.com/path?q=1&r=2#frag",
    "<s> </s> [INST] not special here [/INST]",
    "tab\tseparated\tvalues\n1\t2\t3",
    "",
    " ",
    "\n",
]


# Where lifeboat deliberately follows the model's own tokenizer (Hugging Face) instead of
# llama.cpp. llama.cpp promotes every vocabulary entry spelled "</s>" to a control,
# end-of-generation token (a workaround added for one OCR model); in Qwen's vocabulary
# "</s>" is ordinary text (an HTML close tag), so lifeboat keeps it text and does not end
# generation on it. The test checks these cases differ only there.
LLAMA_CPP_QUIRKS = {
    "<s> </s> [INST] not special here [/INST]": "llama.cpp treats the normal vocabulary entry '</s>' as a control token",
}


def vocab_only_copy(src: Path, dst: Path) -> Path:
    reader = HeaderReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    models_dir, out_dir, scratch = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    models = {
        "deepseek-r1-distill-qwen": "DeepSeek-R1-Distill-Qwen-7B.header.gguf",
        "qwen2.5-coder": "qwen2.5-coder-0.5b-instruct.gguf",
        "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    }
    for name, file in models.items():
        path = models_dir / file
        loadable = path
        if "header" in file:
            loadable = vocab_only_copy(path, scratch / f"{name}.vocab.gguf")
        llm = llama_cpp.Llama(str(loadable), vocab_only=True, verbose=False)
        cases = []
        for text in TEXTS:
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            case = {"text": text, "ids": ids}
            quirk = LLAMA_CPP_QUIRKS.get(text)
            promoted = len(llm.tokenize(b"</s>", add_bos=False, special=True)) == 1 and len(
                llm.tokenize(b"</s>", add_bos=False, special=False)
            ) > 1
            if quirk and promoted:
                case["llama_cpp_quirk"] = quirk
            cases.append(case)
        fixture = {
            "model": file,
            "sha256": sha256(path),
            "reference": f"llama-cpp-python {llama_cpp.__version__}, vocab_only, add_bos=False, special=True",
            "pre": llm.metadata.get("tokenizer.ggml.pre"),
            "cases": cases,
        }
        target = out_dir / f"{name}.json"
        target.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
        print(f"wrote {target} ({len(cases)} cases, pre={fixture['pre']})")


if __name__ == "__main__":
    main()
