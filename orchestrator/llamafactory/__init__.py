"""The LlamaFactory backend (`fine_tuner.type: llamafactory`): LlamaFactory's own trainer, run by
`llamafactory-cli train` in a managed environment of its own (it pins older transformers, peft,
accelerate and datasets than ours).

    translate.py   strategy -> LlamaFactory's train config and dataset_info.json (pure, no torch)
    env.py         the managed venv: where it lives, creating it on first use
    supervise.py   the job process: writes the configs, runs the trainer, maps its log into
                   metrics.jsonl and its adapter into final/ (python -m orchestrator.llamafactory.supervise JOB_DIR)
"""
