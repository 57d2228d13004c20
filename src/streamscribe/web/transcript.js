// The transcript as a person reads it: finals (never revised) with their time, the current partial
// (tentative, replaced as it changes), and the full text to copy or download.

/** 83.4 -> "01:23.4" (hours appear when needed). */
export function formatTime(seconds) {
  const total = Math.max(0, seconds);
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const rest = (total % 60).toFixed(1).padStart(4, "0");
  const mm = String(minutes).padStart(2, "0");
  return hours ? `${hours}:${mm}:${rest}` : `${mm}:${rest}`;
}

export class TranscriptView {
  constructor({ list, partial, empty, full, fullState, container, onChange }) {
    this.list = list;
    this.partialElement = partial;
    this.empty = empty;
    this.full = full;
    this.fullState = fullState;
    this.container = container;
    this.onChange = onChange;
    this.sessions = [];
  }

  /** A new recording: its finals start at its own time zero, under a divider when others came before. */
  beginSession(label) {
    const session = { finals: [], fullText: null, lastFinalId: -1 };
    if (this.sessions.some((s) => s.finals.length > 0)) {
      const divider = document.createElement("li");
      divider.className = "divider";
      divider.textContent = label;
      this.list.append(divider);
    } else if (this.sessions.length) {
      this.sessions = [];
      this.list.replaceChildren();
    }
    this.sessions.push(session);
    this.setPartial("");
    this.render();
    return session;
  }

  get current() {
    return this.sessions.at(-1) ?? this.beginSession("");
  }

  partial(frame) {
    // A partial for a segment already finalised is late; the next one starts after the last final.
    if (frame.segment_id <= this.current.lastFinalId) return;
    this.setPartial(frame.text, frame.start);
  }

  final(frame) {
    const session = this.current;
    if (frame.segment_id <= session.lastFinalId) return;
    session.lastFinalId = frame.segment_id;
    this.setPartial("");
    const text = frame.text.trim();
    if (!text) return;
    session.finals.push(text);
    const item = document.createElement("li");
    item.className = "final";
    item.dataset.segment = frame.segment_id;
    const time = document.createElement("time");
    time.textContent = formatTime(frame.start);
    time.title = `${formatTime(frame.start)} – ${formatTime(frame.end)} of the stream`;
    const span = document.createElement("span");
    span.textContent = text;
    item.append(time, span);
    this.keepScrolledDown(() => this.list.append(item));
    this.render();
  }

  /** The server's full transcript closes the session's text. */
  fullTranscript(frame) {
    this.current.fullText = frame.text;
    this.setPartial("");
    this.render(true);
  }

  setPartial(text, start = 0) {
    this.keepScrolledDown(() => {
      if (text) {
        const time = document.createElement("time");
        time.textContent = formatTime(start);
        const label = document.createElement("span");
        label.className = "visually-hidden";
        label.textContent = "Tentative: ";
        const span = document.createElement("span");
        span.textContent = text;
        this.partialElement.replaceChildren(time, label, span);
      } else {
        this.partialElement.replaceChildren();
      }
      this.partialElement.hidden = !text;
    });
    this.empty.hidden = Boolean(text) || this.sessions.some((s) => s.finals.length);
  }

  clear() {
    this.sessions = [];
    this.list.replaceChildren();
    this.setPartial("");
    this.render();
  }

  get text() {
    return this.sessions
      .map((s) => (s.fullText ?? s.finals.join(" ")).trim())
      .filter(Boolean)
      .join("\n\n");
  }

  render(complete = false) {
    const text = this.text;
    this.full.value = text;
    this.empty.hidden = Boolean(this.partialElement.textContent) || this.sessions.some((s) => s.finals.length);
    const finished = this.sessions.length > 0 && this.sessions.every((s) => s.fullText !== null);
    this.fullState.textContent = !text ? "" : complete || finished ? "complete" : "live, finished on Stop";
    this.onChange(text);
  }

  keepScrolledDown(change) {
    const box = this.container;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    change();
    if (atBottom) box.scrollTop = box.scrollHeight;
  }
}
