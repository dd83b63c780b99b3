"""Model families and their checkpoints: HF safetensors directories <-> mm directories and params.

Modules (one job each):
  family       the `Family` record and an `Opened` checkpoint.
  llm_family   Llama / Qwen2 decoders (the name-map table `llm_entries`, reused by every composite family).
  hf_vision    CLIP / SigLIP towers, and where a tower's tensors sit inside bigger checkpoints.
  llava_hf     HF `LlavaForConditionalGeneration` directories.
  iaa_release  the original IAA release layout (and the base + adapter export).
  vlm_dir      mm "vlm" directories (IAA or LLaVA-style, with their tower).
  peft_adapter LoRA adapters <-> HF PEFT adapter directories.
  registry     the dispatch: `open_checkpoint`, `load`, `hf_to_mm`, `mm_to_hf`, `save`.
All reading and writing goes through the engine in `mm.checkpoints`.

Adding a family
---------------
Write its name map: a function `config -> NameMap`, a list of `Entry(hf_name, hf_shape, mm_path, transform)` in
canonical order plus regexes of HF names that may be present and are dropped (`mm.checkpoints.name_map`:
`IDENTITY`, `TRANSPOSE`, `SplitHeadsIn/Out/Bias`; a new `Transform` gives `mm_shape`, `to_mm`, `to_hf`).
Composite families reuse tables with prefixes: `llm_entries(config, hf_prefix="language_model.",
mm_prefix=("llm",))`. Then fill in a `Family` (its HF reader `open_hf`, its mm kind, config parse / to_json,
`write_hf`) and add it to `registry`; `load`, the converters and `mm.from_pretrained` then know it.
"""
