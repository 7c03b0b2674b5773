"""Write tokenizer/tokenizer.json for a Latte pipeline whose tokenizer folder holds only
the slow T5Tokenizer's spiece.model (as Latte-1 is published).

`latte sample --prompt` reads tokenizer.json with the Rust `tokenizers` crate. This script
loads the folder with transformers' T5Tokenizer, which converts the SentencePiece model to
a fast tokenizer (transformers' own conversion, so the ids are those LattePipeline gets
with the same transformers), and saves the result beside spiece.model.

Needs transformers 5.24.0 with sentencepiece and protobuf (tools/requirements.txt).

    python tools/convert_tokenizer.py PIPELINE_DIR        # or PIPELINE_DIR/tokenizer
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import T5Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="the pipeline or its tokenizer/ folder")
    args = parser.parse_args()
    folder = args.dir / "tokenizer" if (args.dir / "tokenizer").is_dir() else args.dir
    if not (folder / "spiece.model").is_file() and not (folder / "tokenizer.json").is_file():
        raise SystemExit(f"{folder} holds neither spiece.model nor tokenizer.json")
    tokenizer = T5Tokenizer.from_pretrained(folder)
    out = folder / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(out))
    print(f"wrote {out} ({len(tokenizer)} tokens)")


if __name__ == "__main__":
    main()
