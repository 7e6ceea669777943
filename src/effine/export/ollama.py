"""An Ollama Modelfile beside an exported GGUF: ``ollama create NAME -f runs/x/gguf/x-q8_0.Modelfile``.

Ollama formats prompts with a Go template, not the Jinja chat template embedded in the GGUF, so the chat format
is translated here for the families effine ships (recognised by their turn markers in the Jinja template):

    ChatML (SmolLM2, Qwen2)  <|im_start|>role ... <|im_end|>           stop <|im_end|>, <|im_start|>
    Gemma                    <start_of_turn>user ... <end_of_turn>      stop <end_of_turn>
    Llama-3                  <|start_header_id|>role<|end_header_id|>   stop <|eot_id|>, <|start_header_id|>
    Phi-3                    <|user|> ... <|end|>                       stop <|end|>, <|user|>
    Zephyr                   <|user|> ... </s>                          stop </s>, <|user|>
    Llama-2 / Mistral        [INST] ... [/INST]                         stop [INST], [/INST]

No chat template (a base model): a plain completion template ``{{ .Prompt }}``. A template of another shape: no
TEMPLATE line, so that Ollama falls back to the chat template it reads from the GGUF itself (said in a comment).
PARAMETER lines: the stop strings above (plus the tokenizer's EOS), the context length (capped at 4096), and the
sampling defaults of the model's generation_config.json when it has them.
"""

from __future__ import annotations

import json
from pathlib import Path

# (name, marker in the Jinja template, Go template, stop strings); the first marker that matches wins
FORMATS: list[tuple[str, str, str, list[str]]] = [
    ("chatml", "<|im_start|>",
     "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n"
     "{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
     ["<|im_end|>", "<|im_start|>"]),
    ("gemma", "<start_of_turn>",
     "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
     "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
     ["<end_of_turn>"]),
    ("llama3", "<|start_header_id|>",
     "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
     "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
     "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
     ["<|eot_id|>", "<|start_header_id|>"]),
    ("phi3", "<|end|>",
     "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n"
     "{{ end }}<|assistant|>\n{{ .Response }}<|end|>\n",
     ["<|end|>", "<|user|>"]),
    ("zephyr", "<|user|>",
     "{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}{{ if .Prompt }}<|user|>\n{{ .Prompt }}</s>\n"
     "{{ end }}<|assistant|>\n{{ .Response }}</s>\n",
     ["</s>", "<|user|>"]),
    ("inst", "[INST]",
     "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}",
     ["[INST]", "[/INST]"]),
]
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}


def chat_format(chat_template: str | None) -> tuple[str, str | None, list[str]]:
    """(format name, Go template or None, stop strings) for a Jinja chat template."""
    if not chat_template:
        return "completion", "{{ .Prompt }}", []
    for name, marker, template, stops in FORMATS:
        if marker in chat_template:
            return name, template, list(stops)
    return "unknown", None, []


def modelfile_text(gguf_name: str, chat_template: str | None, eos_token: str | None, context_length: int,
                   generation: dict | None = None) -> str:
    name, template, stops = chat_format(chat_template)
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines = [f"# Ollama Modelfile written by effine: ollama create NAME -f {gguf_name.rsplit('.', 1)[0]}.Modelfile",
             f"FROM ./{gguf_name}", ""]
    if template is None:
        lines += ["# The chat template is not one effine translates; Ollama uses the one embedded in the GGUF.", ""]
    else:
        lines += [f"# chat format: {name}", f'TEMPLATE """{template}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER num_ctx {min(int(context_length), 4096)}")
    for key, param in _SAMPLING.items():
        value = (generation or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"PARAMETER {param} {value}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, model_dir: Path) -> Path:
    """Write ``<gguf stem>.Modelfile`` beside ``gguf_path`` for the model in ``model_dir``; return its path."""
    from transformers import AutoConfig

    from effine.model.loader import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    gen_path = model_dir / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    if generation and not generation.get("do_sample", False):
        generation = None  # greedy by default: no sampling defaults to carry over
    text = modelfile_text(gguf_path.name, getattr(tokenizer, "chat_template", None), tokenizer.eos_token,
                          getattr(config, "max_position_embeddings", 2048) or 2048, generation)
    out = gguf_path.with_suffix(".Modelfile")
    out.write_text(text)
    return out
