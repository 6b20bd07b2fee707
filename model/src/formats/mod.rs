//! Other programs' model formats, as far as they are pure data: which mla models each can
//! hold, their configs, and key/layout maps. No files here (trainer/src/interop/ writes them).
//!
//! * [`litgpt`]: litgpt 0.5.13 checkpoints (`lit_model.pth` + `model_config.yaml`).
//! * [`hf`]: Hugging Face `transformers` models (GPTNeoX).

pub mod hf;
pub mod litgpt;
