// DOM of one turn: the question, then the answer as it streams (text, tool calls, the outcome).
// Every part is also recorded in the Turn, so a session's transcript can be stored and replayed.
import type { ChatEvent, Failure } from "./chat";
import type { Part, Turn } from "./store";

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K, className: string, text?: string,
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A tool's JSON input: on one line when short, indented when not (and as sent when not JSON). */
function prettyJson(text: string): string {
  try {
    const value: unknown = JSON.parse(text);
    const line = JSON.stringify(value);
    return line.length <= 72 ? line : JSON.stringify(value, null, 2);
  } catch {
    return text;
  }
}

function seconds(ms: number): string {
  return ms < 10_000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms / 1000)} s`;
}

export class TurnView {
  readonly element: HTMLLIElement;
  private readonly answer: HTMLElement;
  private textNode: Text | null = null;
  private readonly tools = new Map<string, HTMLDetailsElement>();

  constructor(readonly turn: Turn) {
    this.element = el("li", "turn");
    const question = el("div", "question");
    question.append(el("span", "visually-hidden", "You: "), turn.question);
    this.answer = el("div", "answer");
    this.answer.prepend(el("span", "visually-hidden", "Agent: "));
    this.element.append(question, this.answer);
    for (const part of turn.parts) this.draw(part);
  }

  set busy(value: boolean) {
    this.answer.setAttribute("aria-busy", String(value));
  }

  /** Record and draw one streamed event. */
  apply(event: ChatEvent): void {
    switch (event.kind) {
      case "text": {
        const last = this.turn.parts.at(-1);
        if (last?.kind === "text") last.text += event.text;
        else this.turn.parts.push({ kind: "text", text: event.text });
        this.appendText(event.text);
        return;
      }
      case "tool_use":
        return this.add({ kind: "tool", id: event.id, name: event.name, input: event.input });
      case "tool_result": {
        const tool = this.turn.parts.find((p): p is Extract<Part, { kind: "tool" }> =>
          p.kind === "tool" && p.id === event.id);
        if (!tool) return this.add({ kind: "tool", id: event.id, name: event.name, input: "", ...result(event) });
        Object.assign(tool, result(event));
        return this.drawResult(tool);
      }
      case "done":
        return this.add({ ...event });
      case "error":
        return this.add({ ...event });
    }
  }

  /** The call ended with a status: drawn unless the stream's own `error` event already said it. */
  failed(failure: Failure): void {
    const last = this.turn.parts.at(-1);
    if (last?.kind === "error" && last.code === failure.code) return;
    this.add({ kind: "error", ...failure });
  }

  stopped(): void {
    this.add({ kind: "stopped" });
  }

  private add(part: Part): void {
    this.turn.parts.push(part);
    this.draw(part);
  }

  private draw(part: Part): void {
    switch (part.kind) {
      case "text":
        return this.appendText(part.text);
      case "tool":
        return this.drawTool(part);
      case "done": {
        const bits = [`${part.outputTokens} tokens`, seconds(part.durationMs)];
        if (part.stopReason && part.stopReason !== "end_turn") bits.unshift(part.stopReason);
        this.textNode = null;
        this.answer.append(el("p", "meta done", bits.join(" · ")));
        return;
      }
      case "error": {
        this.textNode = null;
        const box = el("p", "error");
        box.setAttribute("role", "alert");
        box.append(el("span", "code", part.code), " ", el("span", "message", part.message));
        this.answer.append(box);
        return;
      }
      case "stopped":
        this.textNode = null;
        this.answer.append(el("p", "meta stopped", "Stopped: the call was cancelled (CANCELLED)"));
        return;
    }
  }

  private appendText(text: string): void {
    if (this.textNode) {
      this.textNode.appendData(text);
      return;
    }
    const block = el("div", "text");
    this.textNode = document.createTextNode(text);
    block.append(this.textNode);
    this.answer.append(block);
  }

  private drawTool(part: Extract<Part, { kind: "tool" }>): void {
    this.textNode = null; // text after a tool call starts a new paragraph below it
    const card = el("details", "tool");
    card.open = true;
    card.dataset.toolId = part.id;
    card.dataset.toolName = part.name;
    const summary = el("summary", "tool-head");
    summary.append(el("span", "tool-kind", "tool"), " ", el("code", "tool-name", part.name), " ",
      el("span", "tool-status", "running…"));
    const body = el("div", "tool-body");
    body.append(el("div", "tool-label", "input"), el("pre", "tool-input", prettyJson(part.input) || "{}"));
    card.append(summary, body);
    this.tools.set(part.id, card);
    this.answer.append(card);
    if (part.status !== undefined) this.drawResult(part);
  }

  private drawResult(part: Extract<Part, { kind: "tool" }>): void {
    const card = this.tools.get(part.id);
    if (!card) return;
    const status = part.status || "success";
    card.dataset.status = status;
    const label = card.querySelector(".tool-status");
    if (label) label.textContent = status === "success" ? "done" : status;
    card.querySelector(".tool-body")?.append(
      el("div", "tool-label", "result"), el("pre", "tool-output", part.output ?? ""));
  }
}

function result(event: Extract<ChatEvent, { kind: "tool_result" }>): { status: string; output: string } {
  return { status: event.status, output: event.output };
}
