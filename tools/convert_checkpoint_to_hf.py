#!/usr/bin/env python
"""Convert a megaspark training checkpoint to an HF draft directory (DSPARK_SPEC.md §9).

The checkpoint may have been saved at any tensor/pipeline/data-parallel layout; the
conversion runs in this single process (a one-rank gloo group, the draft built at
TP = 1) and reads only the model part of the checkpoint. The output directory holds
``config.json`` and ``model.safetensors`` and is written atomically.

Examples::

    python tools/convert_checkpoint_to_hf.py --load checkpoints/smollm2 --output export/smollm2
    python tools/convert_checkpoint_to_hf.py --load checkpoints/qwen3/iter_0010000 \\
        --output export/qwen3-specforge --layout specforge

An ``--algorithm eagle3`` checkpoint converts to the engines' Eagle3 format
(``LlamaForCausalLMEagle3``, megaspark/export/eagle3.py; ``--layout`` does not apply).

Check the result with ``python tools/validate_hf_export.py DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # allow `python tools/convert_checkpoint_to_hf.py` from a checkout
    sys.path.insert(0, str(_REPO))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint_to_hf.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="layouts: deepspec = DeepSpec-native (top-level fields, embeddings shipped; what "
               "vLLM/SGLang load as Qwen3DSparkModel); specforge = SpecForge/z-lab style "
               "(dflash_config nesting, embeddings left out).",
    )
    p.add_argument("--load", required=True,
                   help="megaspark checkpoint: a --save directory (uses 'latest') or an iter_N directory")
    p.add_argument("--output", required=True, help="HF output directory (replaced if it exists)")
    p.add_argument("--layout", default="deepspec", choices=["deepspec", "specforge"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--embeddings", dest="embeddings", action="store_true", default=None,
                   help="ship the frozen embed_tokens/lm_head copies (default for deepspec)")
    g.add_argument("--no-embeddings", dest="embeddings", action="store_false",
                   help="leave out embed_tokens/lm_head (default for specforge)")
    p.add_argument("--target-model", default=None,
                   help="target model (HF directory or builtin:<name>) whose config the export "
                        "copies; default: the checkpoint's --target-model")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module=r"megatron\.")  # deprecation noise of the library
    from megaspark.checkpoint_files import CheckpointError
    from megaspark.export.loading import export_checkpoint
    from megaspark.export.tensors import ExportError
    from megaspark.parallel import destroy_distributed

    from megaspark.export.eagle3 import export_eagle3_checkpoint, is_eagle3_checkpoint

    try:
        if is_eagle3_checkpoint(args.load):  # --algorithm eagle3: the engines' Eagle3 format
            summary = export_eagle3_checkpoint(args.load, args.output, include_embeddings=bool(args.embeddings),
                                               target_model=args.target_model)
        else:
            summary = export_checkpoint(args.load, args.output, layout=args.layout,
                                        include_embeddings=args.embeddings, target_model=args.target_model)
    except (ExportError, CheckpointError, FileNotFoundError) as e:
        print(f"convert_checkpoint_to_hf.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch

        if torch.distributed.is_initialized():
            destroy_distributed()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        layout = summary["parallel_layout"] or {}
        print(f"converted {summary['checkpoint']} (iteration {summary['iteration']}, saved at "
              f"TP {layout.get('tp', '?')} PP {layout.get('pp', '?')} DP {layout.get('dp', '?')})")
        print(f"  -> {summary['output']}")
        if summary["layout"] == "eagle3":
            print(f"  {summary['architecture']} (Eagle3), embeddings "
                  f"{'included' if summary['include_embeddings'] else 'left out'}, target {summary['target']}")
            return 0
        print(f"  layout {summary['layout']}, slot convention {summary['convention']}, embeddings "
              f"{'included' if summary['include_embeddings'] else 'left out'}, target {summary['target']}")
        print(f"  parameters: {summary['trainable_parameters']:,} trainable + "
              f"{summary['frozen_parameters']:,} frozen (embedding + LM head)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
