"""The names export accepts, in one place for the schema, the CLI and the exporter (no imports, so
the CLI can offer them as choices without loading pydantic)."""

FORMATS = ("merged", "gguf", "adapter-gguf", "ollama")
# Each quantization with the GGUF file type it writes (the name in gguf-py's LlamaFileType and, with
# LLAMA_FTYPE_ before it, in llama.h's llama_ftype). Written in-process with the gguf package:
IN_PROCESS_QUANTIZATIONS = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                            "q4_0": "MOSTLY_Q4_0"}
# Through llama.cpp's quantizer (llama-cpp-python):
K_QUANTIZATIONS = {"q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}
QUANTIZATIONS = (*IN_PROCESS_QUANTIZATIONS, *K_QUANTIZATIONS)
MERGED_PRECISIONS = ("f32", "f16", "bf16")
# Verification prompts when the strategy names none: this many from the job's own training data (the
# domain the model was tuned for, where its answers are sharp), else these general ones.
VERIFY_PROMPTS_FROM_DATA = 3
GENERAL_VERIFY_PROMPTS = (
    "What are the symptoms of anemia?",
    "Explain photosynthesis in one sentence.",
    "Write a short poem about the sea.",
)
