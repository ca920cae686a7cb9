// What the page remembers in this browser (localStorage): the token, recent sessions, their transcripts.
// Storage can be unavailable or full (private windows, quotas): then the page simply forgets.

export type Part =
  | { kind: "text"; text: string }
  | { kind: "tool"; id: string; name: string; input: string; status?: string; output?: string }
  | { kind: "done"; stopReason: string; outputTokens: number; durationMs: number }
  | { kind: "error"; code: string; message: string }
  | { kind: "stopped" };

export interface Turn {
  question: string;
  parts: Part[];
}

const PREFIX = "agent-chat:";
const MAX_SESSIONS = 20;
const MAX_TURNS = 50;

function read<T>(key: string, fallback: T): T {
  try {
    const raw = window.localStorage.getItem(PREFIX + key);
    return raw === null ? fallback : (JSON.parse(raw) as T);
  } catch {
    return fallback;
  }
}

function write(key: string, value: unknown): void {
  try {
    if (value === "" || value === undefined) window.localStorage.removeItem(PREFIX + key);
    else window.localStorage.setItem(PREFIX + key, JSON.stringify(value));
  } catch {
    // Not remembered; the page works the same.
  }
}

export const token = {
  get: (): string => read("token", ""),
  set: (value: string): void => write("token", value),
};

export const currentSession = {
  get: (): string => read("current", ""),
  set: (value: string): void => write("current", value),
};

/** Session ids, most recently used first. */
export function recentSessions(): string[] {
  const ids = read<unknown>("sessions", []);
  return Array.isArray(ids) ? ids.filter((id): id is string => typeof id === "string") : [];
}

export function touchSession(id: string): string[] {
  if (!id) return recentSessions();
  const ids = [id, ...recentSessions().filter((other) => other !== id)];
  for (const dropped of ids.splice(MAX_SESSIONS)) write(`transcript:${dropped}`, undefined);
  write("sessions", ids);
  return ids;
}

export function transcript(id: string): Turn[] {
  const turns = id ? read<unknown>(`transcript:${id}`, []) : [];
  return Array.isArray(turns) ? (turns as Turn[]) : [];
}

export function saveTranscript(id: string, turns: Turn[]): void {
  if (id) write(`transcript:${id}`, turns.slice(-MAX_TURNS));
}
