// Renders an Ollama TEMPLATE the way Ollama does (Go's text/template over .Messages and .Tools, with
// Ollama's `json` function), so the tests can compare it with the text the model was trained on.
// Reads {"template", "messages", "tools"} JSON on stdin and writes the rendered prompt to stdout.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type ToolCallFunction struct {
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}

type ToolCall struct {
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
}

type Input struct {
	Template string           `json:"template"`
	Messages []Message       `json:"messages"`
	Tools    []map[string]any `json:"tools"`
}

// Ollama's template function of the same name: compact JSON, map keys sorted.
func toJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Funcs(template.FuncMap{"json": toJSON}).Parse(in.Template))
	if err := tmpl.Execute(os.Stdout, map[string]any{"Messages": in.Messages, "Tools": in.Tools}); err != nil {
		panic(err)
	}
}
