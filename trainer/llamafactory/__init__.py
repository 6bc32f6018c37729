"""The LlamaFactory backend (`fine_tuner.type: llamafactory`): LlamaFactory's own trainer, run by
`llamafactory-cli train` in a managed environment of its own (it pins older transformers, peft,
accelerate and datasets than ours).

    contract/llamafactory.py   where its venv lives, which strategies it runs, strategy -> its train
                               config and dataset_info.json (pure; the host reads it too)
    env.py                     creating the managed venv on first use
    supervise.py               the job process: writes the configs, runs the trainer, maps its log into
                               metrics.jsonl and its adapter into final/ (python -m trainer.llamafactory.supervise JOB_DIR)
"""
