"""Worker of tests/test_sglang_serving.py: one export through SGLang's own DSpark draft
class and weight loader per process (SGLang initializes its runtime once per process).

usage: python tests/sglang_loader_worker.py EXPORT_DIR
"""
import json
import sys

from megaspark.targets.sglang_runtime import check_draft_in_sglang

if __name__ == "__main__":
    print("RESULT " + json.dumps(check_draft_in_sglang(sys.argv[1])), flush=True)
