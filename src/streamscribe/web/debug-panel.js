// The collapsible debug panel: connection state and the last messages exchanged. Audio frames are
// counted, not listed, so the log stays readable; keys never appear in it.

const MAX_ENTRIES = 200;

function clock() {
  const now = new Date();
  return `${now.toLocaleTimeString([], { hour12: false })}.${String(now.getMilliseconds()).padStart(3, "0")}`;
}

export class DebugPanel {
  constructor({ log, connection, url, audio, close, clearButton }) {
    this.log = log;
    this.connection = connection;
    this.url = url;
    this.audio = audio;
    this.close = close;
    this.audioEntry = null;
    this.audioFrames = 0;
    clearButton.addEventListener("click", () => {
      this.log.replaceChildren();
      this.audioEntry = null;
    });
  }

  setConnection(state) {
    this.connection.textContent = state;
  }

  setUrl(url) {
    this.url.textContent = url;
  }

  /** What a StreamClient has sent: samples at `rate`, or bytes of encoded audio (Opus). */
  setAudio({ framesSent, samplesSent, bytesSent }, rate) {
    if (!framesSent) this.audio.textContent = "–";
    else if (bytesSent) this.audio.textContent = `${framesSent} frames, ${(bytesSent / 1024).toFixed(1)} KiB of Opus`;
    else this.audio.textContent = `${framesSent} frames, ${(samplesSent / rate).toFixed(1)} s at ${rate / 1000} kHz`;
  }

  setClose({ code, reason }) {
    this.close.textContent = `${code}${reason ? ` (${reason})` : ""}`;
  }

  sent(frame) {
    if (frame.type === "audio") {
      // One line for a run of audio frames, updated in place.
      if (!this.audioEntry || this.log.lastElementChild !== this.audioEntry) {
        this.audioFrames = 0;
        this.audioEntry = this.add("out", "audio", "");
      }
      this.audioFrames += 1;
      this.audioEntry.querySelector(".body").textContent = `× ${this.audioFrames} frames`;
      return;
    }
    this.add("out", frame.type, JSON.stringify(frame));
  }

  received(frame) {
    this.add("in", frame.type, JSON.stringify(frame));
  }

  note(text) {
    this.add("note", "note", text);
  }

  add(direction, type, body) {
    const item = document.createElement("li");
    item.dataset.direction = direction;
    item.dataset.type = type;
    const time = document.createElement("time");
    time.textContent = clock();
    const arrow = document.createElement("span");
    arrow.className = "direction";
    arrow.textContent = direction === "in" ? "←" : direction === "out" ? "→" : "•";
    arrow.title = direction === "in" ? "from the server" : direction === "out" ? "to the server" : "page";
    const kind = document.createElement("span");
    kind.className = "type";
    kind.textContent = type;
    const text = document.createElement("span");
    text.className = "body";
    text.textContent = body;
    item.append(time, arrow, kind, text);
    const follow = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 30;
    this.log.append(item);
    while (this.log.childElementCount > MAX_ENTRIES) this.log.firstElementChild.remove();
    if (follow) this.log.scrollTop = this.log.scrollHeight;
    return item;
  }
}
