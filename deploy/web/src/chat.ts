// One StreamChat call over gRPC-Web (same origin, through Envoy), as a stream of plain events.
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AgentService, type ChatResponse } from "./gen/agent/agent_pb";

export type ChatEvent =
  | { kind: "text"; text: string }
  | { kind: "tool_use"; id: string; name: string; input: string }
  | { kind: "tool_result"; id: string; name: string; status: string; output: string }
  | { kind: "done"; stopReason: string; outputTokens: number; durationMs: number }
  | { kind: "error"; code: string; message: string };

export interface ChatCall {
  content: string;
  /** Empty: a fresh, unremembered conversation. */
  sessionId: string;
  /** Empty: no authorization header. */
  token: string;
  signal: AbortSignal;
}

/** A failed call, named as gRPC names it (CANCELLED, INVALID_ARGUMENT, UNAVAILABLE, ...). */
export interface Failure {
  code: string;
  message: string;
}

// Index = gRPC status number, the same numbering as connect's Code enum.
const STATUS_NAMES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
  "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
] as const;

export function statusName(code: Code): string {
  return STATUS_NAMES[code] ?? `STATUS_${code}`;
}

export function failureOf(error: unknown): Failure {
  const connectError = ConnectError.from(error);
  return { code: statusName(connectError.code), message: connectError.rawMessage };
}

export function isCancel(failure: Failure): boolean {
  return failure.code === statusName(Code.Canceled);
}

const client = createClient(
  AgentService,
  // Binary gRPC-Web on the page's own origin: Envoy's grpc_web filter turns it into gRPC.
  createGrpcWebTransport({ baseUrl: window.location.origin, useBinaryFormat: true }),
);

function eventOf(response: ChatResponse): ChatEvent | undefined {
  const r = response.response;
  switch (r.case) {
    case "content":
      return { kind: "text", text: r.value.text };
    case "toolUse":
      return { kind: "tool_use", id: r.value.toolId, name: r.value.toolName, input: r.value.input };
    case "toolResult":
      return {
        kind: "tool_result", id: r.value.toolId, name: r.value.toolName, status: r.value.status, output: r.value.output,
      };
    case "done":
      return {
        kind: "done",
        stopReason: r.value.stopReason,
        outputTokens: Number(r.value.usage?.outputTokens ?? 0n),
        durationMs: r.value.durationMs,
      };
    case "error":
      return { kind: "error", code: r.value.code, message: r.value.message };
    default:
      return undefined; // a kind this page does not know yet
  }
}

/** The events of one answer as they arrive; throws a ConnectError when the call fails or is aborted. */
export async function* streamChat(call: ChatCall): AsyncGenerator<ChatEvent> {
  const headers = new Headers();
  if (call.token) headers.set("authorization", `Bearer ${call.token}`);
  // Envoy hashes this header, so a session's calls reach the replica holding its agent.
  if (call.sessionId) headers.set("x-session-id", call.sessionId);
  const request = { content: call.content, sessionId: call.sessionId };
  for await (const response of client.streamChat(request, { signal: call.signal, headers })) {
    const event = eventOf(response);
    if (event) yield event;
  }
}
