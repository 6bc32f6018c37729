"""The names export accepts, in one place for the schema, the CLI and the exporter (no imports, so
the CLI can offer them as choices without loading pydantic)."""

FORMATS = ("merged", "gguf", "adapter-gguf", "ollama")
# Written in-process with the gguf package.
IN_PROCESS_QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q4_0")
# Need llama.cpp's quantizer (llama-cpp-python).
K_QUANTIZATIONS = ("q4_k_m", "q5_k_m", "q6_k")
QUANTIZATIONS = IN_PROCESS_QUANTIZATIONS + K_QUANTIZATIONS
MERGED_PRECISIONS = ("f32", "f16", "bf16")
# Verification prompts when the strategy names none: this many from the job's own training data (the
# domain the model was tuned for, where its answers are sharp), else these general ones.
VERIFY_PROMPTS_FROM_DATA = 3
GENERAL_VERIFY_PROMPTS = (
    "What are the symptoms of anemia?",
    "Explain photosynthesis in one sentence.",
    "Write a short poem about the sea.",
)
