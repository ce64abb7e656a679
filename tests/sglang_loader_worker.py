"""Worker of tests/test_sglang_serving.py: one export through SGLang per process (SGLang
initializes its runtime once per process).

usage: python tests/sglang_loader_worker.py EXPORT_DIR             # SGLang's class + loader
       python tests/sglang_loader_worker.py EXPORT_DIR --blocks [SERVED_DIR]
           # + draft blocks run by SGLang against megaspark's (SGLang loads SERVED_DIR)
"""
import json
import sys

if __name__ == "__main__":
    if "--blocks" in sys.argv[2:]:
        from megaspark.export.sglang_parity import compare_with_sglang

        rest = sys.argv[sys.argv.index("--blocks") + 1:]
        result = compare_with_sglang(sys.argv[1], served_path=rest[0] if rest else None)
    else:
        from megaspark.targets.sglang_runtime import check_draft_in_sglang

        result = check_draft_in_sglang(sys.argv[1])
    print("RESULT " + json.dumps(result), flush=True)
