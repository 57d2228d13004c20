// The streamscribe WebSocket protocol, client side: config first, then audio frames, commit, reset, close.
// See the README, "The WebSocket protocol". Frames are JSON text; audio is base64 little-endian float32 in
// JSON frames, or Opus (WebM pages from MediaRecorder) in binary frames.

export const STREAM_PATH = "api/v1/audio/stream/transcribe";
export const STATUS_PATH = "api/v1/audio/stream/status";

/** What each close code means for a person, in one sentence. */
export const CLOSE_MESSAGES = {
  1000: "The session ended normally.",
  1001: "The server ended the session: it is shutting down, or nothing was sent for too long.",
  1006: "The connection to the server was lost.",
  1008: "The server does not accept connections from this network address.",
  1011: "The server's speech engine failed, so the session was ended.",
  1013: "The server is busy or cannot check usage limits right now. Try again in a moment.",
  4003: "Your quota is used up: the server ended the stream. Try again when it renews, or ask for more.",
  4400: "The server refused the session's messages (protocol error).",
  4401: "The server rejected the API key. Check it, Save it, and start again.",
  4403: "This API key may not open streams (it may only read its limits).",
  4429: "Too many connection attempts: wait a minute, then start again.",
};

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Base64 of the samples as little-endian float32, whatever the machine's byte order. */
export function encodeFloat32(samples) {
  let bytes;
  if (LITTLE_ENDIAN) {
    bytes = new Uint8Array(samples.buffer, samples.byteOffset, samples.byteLength);
  } else {
    const view = new DataView(new ArrayBuffer(samples.length * 4));
    samples.forEach((value, i) => view.setFloat32(i * 4, value, true));
    bytes = new Uint8Array(view.buffer);
  }
  let binary = "";
  const step = 0x8000; // String.fromCharCode takes a bounded number of arguments.
  for (let i = 0; i < bytes.length; i += step) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(binary);
}

/**
 * The socket URL for this page's server. It carries no key: browsers cannot set headers on a WebSocket,
 * and a ?token= would land in proxies' access logs, so the key goes in the first message instead.
 */
export function streamUrl() {
  const url = new URL(STREAM_PATH, document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

/**
 * One streaming session. Events (CustomEvent, detail = the frame or close info):
 * "message" for every server frame, "sent" for every client frame, "state" on state changes,
 * "close" once with {code, reason, error} where error is the last error frame, if any.
 */
export class StreamClient extends EventTarget {
  constructor(token, config) {
    super();
    this.token = token;
    this.config = { type: "config", ...config };
    this.socket = null;
    this.state = "idle";
    this.pending = [];
    this.lastError = null;
    this.framesSent = 0;
    this.samplesSent = 0;
    this.bytesSent = 0;
    this.commitWaiters = [];
  }

  get displayUrl() {
    return streamUrl();
  }

  setState(state) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: state }));
  }

  /** Opens the socket and sends the config; audio sent before it opens is queued. */
  open() {
    this.setState("connecting");
    const socket = new WebSocket(streamUrl());
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.setState("configuring");
      // The key first ({"type":"auth"}), sent past send() so that the debug panel never shows it.
      socket.send(JSON.stringify({ type: "auth", token: this.token }));
      this.dispatchEvent(new CustomEvent("sent", { detail: { type: "auth", token: "•••" } }));
      this.send(this.config);
      for (const frame of this.pending.splice(0)) this.send(frame);
    });
    socket.addEventListener("message", (event) => this.receive(event.data));
    socket.addEventListener("close", (event) => {
      const detail = { code: event.code, reason: event.reason, error: this.lastError };
      for (const waiter of this.commitWaiters.splice(0)) waiter.reject(detail);
      this.setState("closed");
      this.dispatchEvent(new CustomEvent("close", { detail }));
    });
  }

  receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      frame = { type: "unparsable", text: String(data).slice(0, 200) };
    }
    if (frame.type === "status" && frame.state === "ready") this.setState("ready");
    if (frame.type === "error") this.lastError = frame;
    if (frame.type === "full_transcript") this.commitWaiters.shift()?.resolve(frame);
    this.dispatchEvent(new CustomEvent("message", { detail: frame }));
  }

  send(frame) {
    if (!this.socket || this.socket.readyState === WebSocket.CONNECTING) {
      this.pending.push(frame);
      return;
    }
    if (this.socket.readyState !== WebSocket.OPEN) return;
    const binary = frame instanceof ArrayBuffer;
    this.socket.send(binary ? frame : JSON.stringify(frame));
    this.dispatchEvent(new CustomEvent("sent", { detail: binary ? { type: "audio", bytes: frame.byteLength } : frame }));
  }

  sendAudio(samples) {
    this.framesSent += 1;
    this.samplesSent += samples.length;
    this.send({ type: "audio", data: encodeFloat32(samples) });
  }

  /** Sends encoded audio (the configured format's bytes, e.g. Opus pages) as one binary frame. */
  sendEncoded(bytes) {
    this.framesSent += 1;
    this.bytesSent += bytes.byteLength;
    this.send(bytes);
  }

  /** True when the socket is not backed up (a server under load stops reading: audio waits, never drops). */
  get canSend() {
    return !this.socket || this.socket.bufferedAmount < 1_000_000;
  }

  /** Sends commit; resolves with the full_transcript frame, rejects with close info if the socket closes. */
  commit(timeoutMs = 60000) {
    return new Promise((resolve, reject) => {
      if (this.socket && this.socket.readyState > WebSocket.OPEN) {
        reject({ code: 0, reason: "the connection is already closed" });
        return;
      }
      const timer = setTimeout(() => reject({ code: 0, reason: "no full transcript in time" }), timeoutMs);
      this.commitWaiters.push({
        resolve: (frame) => { clearTimeout(timer); resolve(frame); },
        reject: (info) => { clearTimeout(timer); reject(info); },
      });
      this.send({ type: "commit" });
    });
  }

  reset() {
    this.send({ type: "reset" });
  }

  close(code = 1000) {
    this.pending = [];
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(code);
  }
}
