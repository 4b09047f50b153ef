"""``python -m lorakit``: where the cache is and what is in it (``python -m lorakit fetch`` fills it).

The cache commands are ``lorakit.assets``'s; this front door adds the list of lorakit's command lines.
"""

import argparse
import sys

from lorakit.runtime import run_main

PROG = "python -m lorakit"
COMMANDS = {
    "python -m lorakit [status]": "show where the cache is and what is in it",
    "python -m lorakit fetch [--force] [NAME]": "fetch and convert the assets (about 100 MB of downloads)",
    "python -m lorakit.finetune --out DIR ...": "fine-tune SmolLM2: full, LoRA or QLoRA",
    "python -m lorakit.finetune --data F.jsonl ...": "instruction-tune on your own JSONL or CSV",
    "python -m lorakit.deploy --adapter DIR --to T": "deploy an adapter: merged, ONNX INT4/FP32, GGUF Q8_0/Q4_1",
    "python -m lorakit.recipe [--full]": "LoRA variants, rank, layers, lr: what to choose",
    "python -m lorakit.memory 65B --method qlora": "estimate the memory of a fine-tune",
    "python -m lorakit.lab": "fine-tune four ways and check the LoRA-vs-QLoRA claims",
}


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        parser = argparse.ArgumentParser(
            prog=PROG,
            usage=f"{PROG} [status | fetch [--force] [NAME]] [--debug]",
            description="Where lorakit's asset cache is and what is in it; fetch fills it.",
            epilog="lorakit's command lines:\n" + "\n".join(f"  {cmd:<47} {what}" for cmd, what in COMMANDS.items()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.print_help()
        return 0
    from lorakit.assets import main as assets_main

    return assets_main([a for a in argv if a != "--debug"] or ["status"])


if __name__ == "__main__":
    sys.exit(run_main(main, prog=PROG))
