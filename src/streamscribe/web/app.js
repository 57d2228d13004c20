// The page: wires the key form, the engine pickers, the audio sources, the socket and the views together.

import { DebugPanel } from "./debug-panel.js";
import { EnginePicker } from "./engine-picker.js";
import {
  FileSource,
  MicrophoneSource,
  OPUS_BITS_PER_SECOND,
  TARGET_RATE,
  decodeAudioFile,
  opusRecorderType,
} from "./sources.js";
import { CLOSE_MESSAGES, StreamClient } from "./stream-client.js";
import { TranscriptView, formatTime } from "./transcript.js";
import { Visualizer } from "./visualizer.js";

const KEY_STORAGE = "streamscribe.apiKey";
const $ = (id) => document.getElementById(id);

const ui = {
  key: $("api-key"),
  keyForm: $("key-form"),
  keyToggle: $("key-toggle"),
  keyNote: $("key-note"),
  start: $("start"),
  stop: $("stop"),
  clear: $("clear"),
  timer: $("timer"),
  activeModel: $("active-model"),
  connection: $("connection"),
  connectionText: $("connection-text"),
  notices: $("notices"),
  dropzone: $("dropzone"),
  chooseFile: $("choose-file"),
  fileInput: $("file-input"),
  fileStatus: $("file-status"),
  speed: $("speed"),
  encoding: $("audio-encoding"),
  copy: $("copy"),
  download: $("download"),
};

const debug = new DebugPanel({
  log: $("debug-log"),
  connection: $("debug-connection"),
  url: $("debug-url"),
  audio: $("debug-audio"),
  close: $("debug-close"),
  clearButton: $("debug-clear"),
});

const transcript = new TranscriptView({
  list: $("finals"),
  partial: $("partial"),
  empty: $("transcript-empty"),
  full: $("full"),
  fullState: $("full-state"),
  container: $("transcript"),
  onChange: (text) => {
    ui.copy.disabled = !text;
    ui.download.disabled = !text;
  },
});

const visualizer = new Visualizer($("spectrum"), $("meter"), $("meter-fill"), $("meter-peak"));

const picker = new EnginePicker({
  model: $("model"),
  variant: $("variant"),
  language: $("language"),
  languageOther: $("language-other"),
  languageOtherField: $("language-other-field"),
  hint: $("engine-hint"),
  table: $("engines"),
  onChange: () => updateControls(),
});

/** The live session, if any: its socket, its audio source, and whether Stop was asked for. */
let session = null;
/** Whether the engine list failed to load (retried when a key is saved, in case the server wanted one). */
let engineListFailed = false;

// ---- Notices and connection state --------------------------------------------------------------

function notice(kind, title, detail = "") {
  const box = document.createElement("div");
  box.className = `notice ${kind}`;
  box.setAttribute("role", kind === "error" ? "alert" : "status");
  const heading = document.createElement("strong");
  heading.textContent = title;
  box.append(heading);
  if (detail) {
    const text = document.createElement("span");
    text.textContent = detail;
    box.append(text);
  }
  const dismiss = document.createElement("button");
  dismiss.type = "button";
  dismiss.className = "dismiss";
  dismiss.setAttribute("aria-label", "Dismiss");
  dismiss.textContent = "×";
  dismiss.addEventListener("click", () => box.remove());
  box.append(dismiss);
  ui.notices.append(box);
  return box;
}

function clearNotices() {
  ui.notices.replaceChildren();
}

const CONNECTION_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  configuring: "Loading the model…",
  ready: "Live",
  finishing: "Finishing…",
  closed: "Closed",
  error: "Disconnected",
};

function setConnection(state, text = CONNECTION_TEXT[state]) {
  ui.connection.dataset.state = state;
  ui.connectionText.textContent = text;
  debug.setConnection(text === CONNECTION_TEXT[state] ? state : `${state}: ${text}`);
}

function updateControls() {
  const live = session !== null;
  ui.start.disabled = live || Boolean(picker.problem);
  ui.stop.disabled = !live || !session.started || session.finishing;
  ui.chooseFile.disabled = live;
  ui.speed.disabled = live;
  ui.encoding.disabled = live;
  ui.dropzone.classList.toggle("disabled", live);
  picker.setDisabled(live);
}

// ---- The key --------------------------------------------------------------------------------------

function initKey() {
  // A link like /#token=KEY fills the key without sending it to the server in a URL it could log.
  const fromFragment = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromFragment) {
    ui.key.value = fromFragment;
    history.replaceState(null, "", location.pathname + location.search);
    ui.keyNote.textContent = "Key taken from the link; Save keeps it in this browser.";
  } else {
    ui.key.value = localStorage.getItem(KEY_STORAGE) ?? "";
  }
  ui.keyToggle.addEventListener("click", () => {
    const show = ui.key.type === "password";
    ui.key.type = show ? "text" : "password";
    ui.keyToggle.textContent = show ? "Hide" : "Show";
    ui.keyToggle.setAttribute("aria-pressed", String(show));
  });
  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.key.value.trim();
    if (key) {
      localStorage.setItem(KEY_STORAGE, key);
      ui.keyNote.textContent = "Saved in this browser.";
    } else {
      localStorage.removeItem(KEY_STORAGE);
      ui.keyNote.textContent = "No key saved in this browser.";
    }
    ui.key.removeAttribute("aria-invalid");
    if (engineListFailed) loadEngines();
  });
}

// ---- Sessions -------------------------------------------------------------------------------------

function timerLoop() {
  if (!session) return;
  const { source } = session;
  const duration = source.duration;
  ui.timer.textContent = duration
    ? `${formatTime(source.position)} / ${formatTime(duration)}`
    : formatTime(source.position);
  debug.setAudio(session.client, TARGET_RATE);
  session.timer = setTimeout(timerLoop, 100);
}

function handleFrame(frame, current) {
  debug.received(frame);
  if (!current) return;
  switch (frame.type) {
    case "status":
      if (frame.state === "configured") {
        setConnection("configuring", `Loading ${frame.model} (${frame.variant}, ${frame.language})…`);
      } else if (frame.state === "ready") {
        setConnection(session.finishing ? "finishing" : "ready", session.finishing ? undefined : `Live · ${frame.model}`);
        ui.activeModel.textContent = frame.model;
        ui.activeModel.hidden = false;
      } else if (frame.state === "reset") {
        session.awaitingReset = false;
        transcript.clear();
      }
      break;
    case "warning":
      notice("warning", `Fallback: ${frame.active_model} answers instead of ${frame.original_model}`, frame.message);
      break;
    case "partial":
      if (!session.awaitingReset) transcript.partial(frame);
      break;
    case "final":
      if (!session.awaitingReset) transcript.final(frame);
      break;
    case "full_transcript":
      if (!session.awaitingReset) transcript.fullTranscript(frame);
      break;
    case "error":
      // Errors that end the session are explained when the socket closes.
      if (!frame.fatal) {
        notice("error", "The server reported an error", `${frame.message} (${frame.error_type})`);
      }
      break;
    default:
      break;
  }
}

function handleClose({ code, reason, error }) {
  const expected = session.finishing && (code === 1000 || code === 1005);
  endSession();
  if (expected) {
    setConnection("closed", "Finished");
    return;
  }
  setConnection("error", `Closed (${code})`);
  const title = CLOSE_MESSAGES[code] ?? `The connection closed unexpectedly (code ${code}).`;
  const detail = error ? `Server said: ${error.message}` : reason ? `Server said: ${reason}` : "";
  notice("error", title, detail);
  if (code === 4401) {
    ui.key.setAttribute("aria-invalid", "true");
    ui.key.focus();
  }
}

function endSession() {
  if (!session) return;
  const ended = session;
  session = null;
  clearTimeout(ended.timer);
  debug.setAudio(ended.client, TARGET_RATE);
  ended.source.stop().catch(() => {});
  visualizer.stop();
  ended.client.close();
  ui.fileStatus.textContent = "";
  updateControls();
}

/** Starts a session with a microphone (`samples` null) or with decoded file samples. */
async function startSession(samples = null, fileName = "") {
  const token = ui.key.value.trim();
  if (!token) {
    notice("error", "Enter the API key first.", "The server printed it when it started.");
    ui.key.focus();
    return;
  }
  clearNotices();
  ui.key.removeAttribute("aria-invalid");
  // The microphone goes as Opus where the browser records it (files as PCM: they stream faster than real
  // time, and MediaRecorder records in real time only).
  const opus = !samples && ui.encoding.value === "opus";
  const client = new StreamClient(token, {
    ...picker.choice,
    sample_rate: TARGET_RATE,
    audio_format: opus ? "opus" : "float32",
    enable_partial: true,
  });
  const onFrame = (frame) => (opus ? client.sendEncoded(frame) : client.sendAudio(frame));
  const source = samples
    ? new FileSource(samples, Number(ui.speed.value), onFrame, () => finishSession())
    : new MicrophoneSource(onFrame, { opus });
  session = { client, source, started: false, finishing: false, awaitingReset: false, timer: 0 };
  updateControls();
  // Frames from an earlier session's socket, if any still arrive, are logged but change nothing.
  client.addEventListener("message", (event) => handleFrame(event.detail, session?.client === client));
  client.addEventListener("sent", (event) => debug.sent(event.detail));
  client.addEventListener("close", (event) => {
    debug.setClose(event.detail);
    if (session?.client === client) handleClose(event.detail);
  });
  client.addEventListener("state", (event) => {
    if (session?.client === client && ["connecting", "configuring"].includes(event.detail)) setConnection(event.detail);
  });
  debug.setUrl(client.displayUrl);
  transcript.beginSession(`${samples ? fileName : "Microphone"} · ${new Date().toLocaleTimeString()}`);
  ui.activeModel.hidden = true;

  if (!samples) {
    setConnection("connecting", "Waiting for the microphone…");
    try {
      const { label } = await source.start();
      const sending = opus ? `Opus (${opusRecorderType()}, ${OPUS_BITS_PER_SECOND / 1000} kbit/s)` : `${TARGET_RATE} Hz`;
      debug.note(`microphone: ${label}, device rate ${source.sampleRate} Hz, sending ${sending}`);
    } catch (exc) {
      session = null;
      source.stop().catch(() => {});
      updateControls();
      setConnection("idle");
      const denied = exc?.name === "NotAllowedError" || exc?.name === "SecurityError";
      notice(
        "error",
        denied ? "The microphone was blocked." : "The microphone could not be opened.",
        denied ? "Allow it in the browser's site settings, or stream an audio file instead." : String(exc?.message ?? exc),
      );
      return;
    }
    client.open();
  } else {
    client.open();
    source.canSend = () => client.canSend;
    source.start();
    ui.fileStatus.textContent = `Streaming ${fileName} at ${ui.speed.value}× speed…`;
  }
  session.started = true;
  updateControls();
  visualizer.start(source);
  timerLoop();
  ui.stop.focus();
}

/** Stop: no more audio, commit, show the full transcript, then close. */
async function finishSession() {
  if (!session || session.finishing) return;
  const current = session;
  current.finishing = true;
  updateControls();
  setConnection("finishing");
  await current.source.stop();
  visualizer.stop();
  try {
    const frame = await current.client.commit();
    if (session === current) setConnection("closed", "Finished");
    debug.note(`full transcript: ${frame.text.length} characters`);
    current.client.close(1000);
  } catch (info) {
    // A closed socket is explained by the close handler; a silent server is explained here.
    if (info?.code === 0 && session === current) {
      notice("error", "The server did not finish the transcript in time.", "The connection was closed.");
      current.client.close(1000);
    }
  }
}

function clearAll() {
  transcript.clear();
  if (session) {
    // Text already on its way belongs to what was cleared: ignore it until the server confirms the reset.
    session.awaitingReset = true;
    if (!session.finishing) session.client.reset();
  }
  clearNotices();
  if (!session) ui.timer.textContent = formatTime(0);
}

// ---- Files ---------------------------------------------------------------------------------------

async function streamFile(file) {
  if (!file || session) return;
  ui.fileStatus.textContent = `Decoding ${file.name}…`;
  try {
    const samples = await decodeAudioFile(file);
    ui.fileStatus.textContent = "";
    await startSession(samples, file.name);
  } catch (exc) {
    ui.fileStatus.textContent = "";
    notice("error", "The file could not be used.", exc.message);
  }
}

function initFiles() {
  ui.chooseFile.addEventListener("click", () => ui.fileInput.click());
  ui.fileInput.addEventListener("change", () => {
    const [file] = ui.fileInput.files;
    ui.fileInput.value = "";
    streamFile(file);
  });
  // Dropping anywhere on the page works; the zone lights up to show it.
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer?.types.includes("Files")) return;
    depth += 1;
    ui.dropzone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) ui.dropzone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    ui.dropzone.classList.remove("dragging");
    streamFile(event.dataTransfer?.files[0]);
  });
}

// ---- Audio encoding ------------------------------------------------------------------------------

/** Opus by default where this browser records it; PCM (float32) otherwise, or when chosen. */
function initEncoding() {
  if (!opusRecorderType()) {
    ui.encoding.querySelector("option[value=opus]").disabled = true;
    ui.encoding.value = "pcm";
  }
}

// ---- Copy and download ---------------------------------------------------------------------------

function flash(button, text) {
  const original = button.dataset.label ?? button.textContent;
  button.dataset.label = original;
  button.textContent = text;
  setTimeout(() => (button.textContent = original), 1500);
}

async function copyTranscript() {
  const text = transcript.text;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Without a secure context there is no clipboard API: select the text and use the old command.
    const full = $("full");
    full.focus();
    full.select();
    if (!document.execCommand("copy")) {
      flash(ui.copy, "Press Ctrl+C");
      return;
    }
  }
  flash(ui.copy, "Copied");
}

function downloadTranscript() {
  const stamp = new Date().toISOString().slice(0, 16).replace(/[:T]/g, "-");
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([`${transcript.text}\n`], { type: "text/plain;charset=utf-8" }));
  link.download = `transcript-${stamp}.txt`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// ---- Start ---------------------------------------------------------------------------------------

initKey();
initFiles();
initEncoding();
ui.start.addEventListener("click", () => startSession());
ui.stop.addEventListener("click", () => finishSession());
ui.clear.addEventListener("click", clearAll);
ui.copy.addEventListener("click", copyTranscript);
ui.download.addEventListener("click", downloadTranscript);
window.addEventListener("pagehide", () => session?.client.close());
setConnection("idle");
updateControls();
// On a phone the engine table would push the recorder far down; it stays one tap away.
if (window.matchMedia("(max-width: 900px)").matches) $("engines-details").open = false;
async function loadEngines() {
  const error = await picker.load(ui.key.value.trim());
  engineListFailed = Boolean(error);
  if (error) notice("warning", "Could not load the engine list.", `${error.message}. Whisper is assumed.`);
  updateControls();
}
loadEngines();
