"""Run inside LlamaFactory's environment by tests/test_llamafactory_backend.py:

    <lf-venv>/bin/python tests/llamafactory_template_ids.py MODEL_DIR TEMPLATE... < conversations.json

Prints, per template and conversation, the token ids LlamaFactory trains on and which of them carry
loss, using LlamaFactory's own template code (TEMPLATE "none": parsed from the tokenizer's Jinja
template), as one JSON line: {template: [{"ids": [...], "trained": [...]}, ...]}.
"""

import json
import sys

from transformers import AutoTokenizer

from llamafactory.data.template import get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments

model_dir, names = sys.argv[1], sys.argv[2:]
conversations = json.load(sys.stdin)
result = {}
for name in names:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # fresh: a template may add tokens to it
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=None if name == "none" else name))
    out = []
    for messages in conversations:
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = [m for m in messages if m["role"] != "system"]
        ids, trained = [], []
        for prompt, answer in template.encode_multiturn(tokenizer, turns, system):
            ids += prompt + answer
            trained += [False] * len(prompt) + [True] * len(answer)
        out.append({"ids": ids, "trained": trained})
    result[name] = out
print(json.dumps(result))
