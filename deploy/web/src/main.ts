// The chat page: wires the form, the session controls and the settings to streamed calls.
import { failureOf, isCancel, streamChat } from "./chat";
import * as store from "./store";
import { TurnView } from "./view";

function byId<T extends HTMLElement>(id: string): T {
  const node = document.getElementById(id);
  if (!node) throw new Error(`the page has no #${id}`);
  return node as T;
}

const ui = {
  conversation: byId<HTMLElement>("conversation"),
  log: byId<HTMLOListElement>("log"),
  empty: byId<HTMLElement>("empty"),
  composer: byId<HTMLFormElement>("composer"),
  message: byId<HTMLTextAreaElement>("message"),
  send: byId<HTMLButtonElement>("send"),
  stop: byId<HTMLButtonElement>("stop"),
  status: byId<HTMLElement>("status"),
  session: byId<HTMLInputElement>("session"),
  recent: byId<HTMLSelectElement>("recent"),
  newSession: byId<HTMLButtonElement>("new-session"),
  settings: byId<HTMLDetailsElement>("settings"),
  token: byId<HTMLInputElement>("token"),
  settingsForm: byId<HTMLFormElement>("settings-form"),
};

interface Page {
  sessionId: string;
  turns: store.Turn[];
  running: AbortController | null;
}

const page: Page = { sessionId: "", turns: [], running: null };

/** 96 random bits: whoever knows a session id can continue that conversation, so it must not be guessable. */
function randomSessionId(): string {
  // getRandomValues also works on plain http:// origins (randomUUID needs a secure context).
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  const base64url = btoa(String.fromCharCode(...bytes)).replaceAll("+", "-").replaceAll("/", "_");
  return `chat-${base64url}`; // 16 characters of [A-Za-z0-9_-], as session ids allow
}

function drawRecent(ids: string[]): void {
  const options = ids.map((id) => new Option(id, id));
  const placeholder = new Option("Recent…", "", true, true);
  placeholder.disabled = true;
  ui.recent.replaceChildren(placeholder, ...options);
  ui.recent.disabled = ids.length === 0 || page.running !== null;
}

function showSession(id: string): void {
  page.sessionId = id;
  page.turns = store.transcript(id);
  ui.session.value = id;
  store.currentSession.set(id);
  ui.log.replaceChildren(...page.turns.map((turn) => new TurnView(turn).element));
  ui.empty.hidden = page.turns.length > 0;
  ui.status.textContent = id ? `Session ${id}` : "No session: this conversation is not remembered";
  scrollToEnd(true);
}

function nearEnd(): boolean {
  const c = ui.conversation;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
}

function scrollToEnd(force: boolean): void {
  if (force || nearEnd()) ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function setRunning(controller: AbortController | null): void {
  page.running = controller;
  const busy = controller !== null;
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
  ui.send.hidden = busy;
  ui.session.disabled = busy;
  ui.newSession.disabled = busy;
  ui.recent.disabled = busy || ui.recent.options.length <= 1;
  ui.composer.setAttribute("aria-busy", String(busy));
}

async function ask(question: string): Promise<void> {
  const sessionId = page.sessionId;
  const turn: store.Turn = { question, parts: [] };
  const view = new TurnView(turn);
  page.turns.push(turn);
  ui.log.append(view.element);
  ui.empty.hidden = true;
  view.busy = true;
  scrollToEnd(true);

  const controller = new AbortController();
  setRunning(controller);
  ui.status.textContent = "Answering…";
  let accepted = false;
  try {
    const events = streamChat({ content: question, sessionId, token: store.token.get(), signal: controller.signal });
    for await (const event of events) {
      const follow = nearEnd();
      if (!accepted && sessionId) drawRecent(store.touchSession(sessionId));
      accepted = true;
      view.apply(event);
      if (follow) scrollToEnd(true);
    }
    ui.status.textContent = "";
  } catch (error) {
    const failure = failureOf(error);
    if (controller.signal.aborted || isCancel(failure)) {
      view.stopped();
      ui.status.textContent = "Stopped";
    } else {
      view.failed(failure);
      ui.status.textContent = `Failed: ${failure.code}`;
      if (failure.code === "UNAUTHENTICATED" || failure.code === "PERMISSION_DENIED") {
        ui.settings.open = true;
        ui.token.focus();
      }
    }
    scrollToEnd(false);
  } finally {
    view.busy = false;
    setRunning(null);
    if (accepted) store.saveTranscript(sessionId, page.turns);
    ui.message.focus();
  }
}

function submit(): void {
  const question = ui.message.value.trim();
  if (!question || page.running) return;
  ui.message.value = "";
  fitMessage();
  void ask(question);
}

function fitMessage(): void {
  ui.message.style.height = "auto";
  ui.message.style.height = `${ui.message.scrollHeight}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
ui.message.addEventListener("input", fitMessage);
ui.stop.addEventListener("click", () => page.running?.abort());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && page.running) page.running.abort();
});
ui.session.addEventListener("change", () => showSession(ui.session.value.trim()));
ui.session.addEventListener("keydown", (event) => {
  if (event.key === "Enter") ui.message.focus(); // leaving the field commits it (change)
});
ui.recent.addEventListener("change", () => {
  if (ui.recent.value) showSession(ui.recent.value);
  drawRecent(store.recentSessions());
});
ui.newSession.addEventListener("click", () => {
  showSession(randomSessionId());
  ui.message.focus();
});
ui.token.value = store.token.get();
ui.token.addEventListener("change", () => store.token.set(ui.token.value.trim()));
ui.settingsForm.addEventListener("submit", (event) => {
  event.preventDefault(); // Enter in the token field keeps it (change) and stays on the page
  store.token.set(ui.token.value.trim());
  ui.settings.open = false;
});

drawRecent(store.recentSessions());
showSession(store.currentSession.get());
document.documentElement.dataset.ready = "true";
ui.message.focus();
