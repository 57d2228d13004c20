// Where audio comes from: the microphone (through an AudioWorklet, or MediaRecorder's Opus) or a decoded
// file. Both hand the page frames (mono Float32Array at TARGET_RATE, or Opus bytes) and offer a window of
// recent samples for the visualizer.

export const TARGET_RATE = 16000;
export const FRAME_MS = 100;
export const OPUS_BITS_PER_SECOND = 32000;
const MAX_FILE_SECONDS = 3 * 60 * 60;
// The containers the server reads Opus in, in the order browsers write them (Chromium: WebM, Firefox: Ogg).
const OPUS_RECORDER_TYPES = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus"];

/** The MediaRecorder type this browser records Opus in, or null when it records none the server reads. */
export function opusRecorderType() {
  if (typeof MediaRecorder === "undefined") return null;
  return OPUS_RECORDER_TYPES.find((type) => MediaRecorder.isTypeSupported(type)) ?? null;
}

/**
 * Live microphone audio: resampled to 16 kHz by capture-worklet.js (Float32Array frames), or with `opus`
 * recorded by MediaRecorder as Opus, each FRAME_MS slice of its stream an ArrayBuffer frame.
 */
export class MicrophoneSource {
  constructor(onFrame, { opus = false } = {}) {
    this.onFrame = onFrame;
    this.opus = opus;
    this.context = null;
    this.stream = null;
    this.node = null;
    this.recorder = null;
    this.sending = Promise.resolve(); // the recorder's slices, handed on in order
    this.analyser = null;
    this.startedAt = 0;
  }

  /** Asks for the microphone and starts posting frames. Throws a DOMException when refused. */
  async start() {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("This browser cannot capture audio here (a microphone needs https or localhost).");
    }
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const context = new AudioContext({ latencyHint: "interactive" });
    this.context = context;
    const input = context.createMediaStreamSource(this.stream);
    this.analyser = context.createAnalyser();
    this.analyser.fftSize = 2048;
    this.analyser.smoothingTimeConstant = 0;
    const mute = context.createGain();
    mute.gain.value = 0;
    mute.connect(context.destination);
    input.connect(this.analyser);
    if (this.opus) {
      this.analyser.connect(mute); // pulled by every browser, as the worklet is below
      this.startRecorder();
    } else {
      await this.startWorklet(context, input, mute);
    }
    if (context.state === "suspended") await context.resume();
    this.startedAt = performance.now();
    return { label: this.stream.getAudioTracks()[0]?.label || "microphone", deviceRate: context.sampleRate };
  }

  startRecorder() {
    const mimeType = opusRecorderType();
    this.recorder = new MediaRecorder(this.stream, { mimeType, audioBitsPerSecond: OPUS_BITS_PER_SECOND });
    // Handed on as ArrayBuffers, in order. (A socket sends Blobs too, but DevTools, and so the tests, do not
    // see Blob frames.)
    this.recorder.addEventListener("dataavailable", (event) => {
      if (!event.data.size) return;
      this.sending = this.sending.then(() => event.data.arrayBuffer()).then((bytes) => this.onFrame(bytes));
    });
    this.recorder.start(FRAME_MS);
  }

  async startWorklet(context, input, mute) {
    await context.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
    this.node = new AudioWorkletNode(context, "streamscribe-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { targetRate: TARGET_RATE, frameMs: FRAME_MS },
    });
    this.node.port.onmessage = (event) => {
      if (event.data.type === "frame") this.onFrame(event.data.samples);
      else if (event.data.type === "flushed") this.flushed?.();
    };
    // The worklet writes nothing, but a node must reach the destination to be pulled by every browser.
    input.connect(this.node);
    this.node.connect(mute);
  }

  get sampleRate() {
    return this.context?.sampleRate ?? TARGET_RATE;
  }

  /** Seconds since capture started. */
  get position() {
    return this.startedAt ? (performance.now() - this.startedAt) / 1000 : 0;
  }

  get duration() {
    return null;
  }

  /** Fills `out` with the most recent samples, at `sampleRate`. */
  readWindow(out) {
    if (this.analyser) this.analyser.getFloatTimeDomainData(out);
    else out.fill(0);
  }

  /** Stops capture after the worklet (or the recorder) has posted what it still holds. */
  async stop() {
    if (this.recorder && this.recorder.state !== "inactive") {
      const recorder = this.recorder;
      await Promise.race([
        new Promise((resolve) => {
          recorder.addEventListener("stop", resolve, { once: true });
          recorder.stop(); // its last slice comes before "stop"
        }),
        new Promise((resolve) => setTimeout(resolve, 500)),
      ]);
    }
    await this.sending;
    if (this.node) {
      await Promise.race([
        new Promise((resolve) => {
          this.flushed = resolve;
          this.node.port.postMessage("flush");
        }),
        new Promise((resolve) => setTimeout(resolve, 500)),
      ]);
      this.node.port.postMessage("stop");
      this.node.disconnect();
    }
    this.stream?.getTracks().forEach((track) => track.stop());
    await this.context?.close().catch(() => {});
    this.node = null;
    this.recorder = null;
    this.analyser = null;
    this.context = null;
    this.stream = null;
  }
}

/** Decodes any file the browser can play into mono samples at 16 kHz. */
export async function decodeAudioFile(file) {
  const bytes = await file.arrayBuffer();
  // Decoding in a 16 kHz context makes the browser resample with its own high-quality resampler.
  const decoder = new OfflineAudioContext(1, 1, TARGET_RATE);
  let decoded;
  try {
    decoded = await decoder.decodeAudioData(bytes);
  } catch {
    throw new Error(`${file.name} could not be decoded: is it an audio file this browser can play?`);
  }
  if (decoded.duration > MAX_FILE_SECONDS) {
    throw new Error(`${file.name} is longer than ${MAX_FILE_SECONDS / 3600} hours.`);
  }
  if (decoded.numberOfChannels === 1 && decoded.sampleRate === TARGET_RATE) {
    return decoded.getChannelData(0).slice();
  }
  // Down-mix (and resample, should the decoder have kept the file's rate) with an offline render.
  const length = Math.max(1, Math.ceil(decoded.duration * TARGET_RATE));
  const mixer = new OfflineAudioContext(1, length, TARGET_RATE);
  const player = mixer.createBufferSource();
  player.buffer = decoded;
  player.connect(mixer.destination);
  player.start();
  const rendered = await mixer.startRendering();
  return rendered.getChannelData(0).slice();
}

/** A decoded file, sent in FRAME_MS frames at `speed` times real time. */
export class FileSource {
  constructor(samples, speed, onFrame, onEnd) {
    this.samples = samples;
    this.speed = speed;
    this.onFrame = onFrame;
    this.onEnd = onEnd;
    this.sent = 0;
    this.timer = null;
    this.startedAt = 0;
    this.canSend = () => true;
  }

  get sampleRate() {
    return TARGET_RATE;
  }

  get duration() {
    return this.samples.length / TARGET_RATE;
  }

  /** Seconds of the file sent so far. */
  get position() {
    return this.sent / TARGET_RATE;
  }

  start() {
    const frameLength = (TARGET_RATE * FRAME_MS) / 1000;
    this.startedAt = performance.now();
    const pump = () => {
      // Send what the clock allows (plus one frame ahead), unless the socket is backed up.
      const due = ((performance.now() - this.startedAt) / 1000) * this.speed * TARGET_RATE + frameLength;
      while (this.sent < this.samples.length && this.sent < due && this.canSend()) {
        const end = Math.min(this.sent + frameLength, this.samples.length);
        this.onFrame(this.samples.slice(this.sent, end));
        this.sent = end;
      }
      if (this.sent >= this.samples.length) {
        this.stop();
        this.onEnd();
      }
    };
    this.timer = setInterval(pump, FRAME_MS / 2);
    pump();
    return { label: "file" };
  }

  readWindow(out) {
    // Follow the clock (frames go out in bursts), never ahead of what the server has been sent.
    const clock = ((performance.now() - this.startedAt) / 1000) * this.speed * TARGET_RATE;
    const end = Math.floor(Math.min(clock, this.sent, this.samples.length));
    const start = Math.max(0, end - out.length);
    out.fill(0);
    out.set(this.samples.subarray(start, end), out.length - (end - start));
  }

  async stop() {
    clearInterval(this.timer);
    this.timer = null;
  }
}
