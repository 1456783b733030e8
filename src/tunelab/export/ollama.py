"""Ollama's Modelfile for an exported GGUF: FROM, TEMPLATE (Ollama's Go-template syntax), PARAMETER stop.

For tunelab's built-in family templates the TEMPLATE is the one Ollama publishes for that family (ollama/ollama,
template/*.gotmpl, which `ollama create` also picks by matching a GGUF's chat template); tests/test_export.py holds
those references with their commits. A custom Jinja template has no Go twin: the Modelfile then has no TEMPLATE and
Ollama falls back to its own detection from the GGUF's embedded chat template (a comment in the file says so).
tunelab configs have no fixed system prompt, so no SYSTEM line is written."""

from __future__ import annotations

from pathlib import Path

GO_TEMPLATES = {
    "chatml": (
        "{{- if .Messages }}\n{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
        "{{ else }}\n{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}"
        "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
        "{{- end }}"),
    "llama3": (
        "{{- if .Messages }}\n{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>\n"
        "{{- end }}\n{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ else -}}\n{{ if .System }}<|start_header_id|>"
        "system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user"
        "<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{{ .Response }}<|eot_id|>\n{{- end -}}"),
    "gemma": (
        "{{- if .Messages }}\n{{- range $index, $_ := .Messages }}<start_of_turn>\n{{- if eq .Role \"user\" }}user\n"
        "{{- if and $.System (eq $index 0) }}\n{{ $.System }}\n{{- end }}\n{{- else if eq .Role \"assistant\" }}model\n"
        "{{- end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n{{ else -}}\n<start_of_turn>user\n"
        "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}<end_of_turn>\n<start_of_turn>model\n{{ .Response }}"
        "<end_of_turn>\n{{ end -}}"),
    "phi3": ("{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n"
             "{{ end }}<|assistant|>\n{{ .Response }}<|end|>"),
    "mistral": (
        "{{- if .Messages }}\n{{- range $index, $_ := .Messages }}\n{{- if eq .Role \"user\" }}[INST] {{ if and $.System "
        "(eq (len (slice $.Messages $index)) 1) }}{{ $.System }}\n{{ end }}{{ .Content }}\n{{- else if eq .Role "
        "\"assistant\" }}[/INST] {{ .Content }}</s>\n{{- end }}\n{{- end }}[/INST]\n{{- else -}}\n[INST] {{ if .System }}"
        "{{ .System }} {{ end }}{{ .Prompt }}[/INST] {{ .Response }}</s>\n{{- end -}}"),
    "alpaca": (
        "{{- $system := \"\" }}\n{{- range .Messages }}\n{{- if eq .Role \"system\" }}\n{{- if not $system }}{{ $system = "
        ".Content }}\n{{- else }}{{ $system = printf \"%s\\n\\n%s\" $system .Content }}\n{{- end }}\n{{- else if eq .Role "
        "\"user\" }}\n{{- if $system }}{{ $system }}\n\n{{ $system = \"\" }}\n{{- end }}### Instruction:\n{{ .Content }}\n\n"
        "{{ else if eq .Role \"assistant\" }}### Response:\n{{ .Content }}\n\n{{ end }}\n{{- end }}### Response:\n"),
}
GO_TEMPLATES["mistral-v1"] = GO_TEMPLATES["mistral"]  # Ollama publishes one Mistral template for both


def modelfile(gguf_name: str, template: str, stop_texts: list[str]) -> str:
    lines = [f"FROM ./{gguf_name}"]
    go = GO_TEMPLATES.get(template)
    if go is not None:
        lines.append(f'TEMPLATE """{go}"""')
    else:
        lines.append("# no TEMPLATE: the run's template has no Ollama twin; Ollama reads the GGUF's chat template")
    lines += [f'PARAMETER stop "{text}"' for text in stop_texts]
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: Path, gguf_name: str, template: str, stop_texts: list[str]) -> Path:
    path = out_dir / "Modelfile"
    path.write_text(modelfile(gguf_name, template, stop_texts))
    return path
