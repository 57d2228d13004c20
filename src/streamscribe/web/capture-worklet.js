// AudioWorklet processor: mixes the microphone to mono, resamples it to the target rate (16 kHz) and posts
// Float32Array frames of `frameMs` to the page. Runs on the audio thread: no allocation per block.
//
// Resampling: a windowed-sinc low-pass (cut-off 7.2 kHz, at least 60 dB down from 8.5 kHz, so nothing
// folds back into the band) followed by linear interpolation at the output instants. Stateful across
// blocks; 97 taps at 48 kHz cost about 5 M multiply-adds a second. tests/web/test_capture_worklet.py
// measures it.

const CUTOFF_FRACTION = 0.45; // of the target rate: 7.2 kHz for 16 kHz

function lowPassTaps(ratio) {
  // ratio = input rate / output rate; taps grow with it so the transition band stays ~2.7 kHz wide.
  const length = 32 * Math.ceil(ratio) + 1;
  const cutoff = CUTOFF_FRACTION / ratio; // cycles per input sample
  const taps = new Float32Array(length);
  const middle = (length - 1) / 2;
  let sum = 0;
  for (let i = 0; i < length; i++) {
    const x = i - middle;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const blackman = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (length - 1))
      + 0.08 * Math.cos((4 * Math.PI * i) / (length - 1));
    taps[i] = sinc * blackman;
    sum += taps[i];
  }
  for (let i = 0; i < length; i++) taps[i] /= sum;
  return taps;
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 16000, frameMs = 100 } = options.processorOptions ?? {};
    // `sampleRate` is the AudioContext's rate, a global of the worklet scope.
    this.ratio = sampleRate / targetRate;
    this.taps = this.ratio > 1 ? lowPassTaps(this.ratio) : null;
    this.history = new Float32Array(this.taps ? this.taps.length : 1);
    this.historyIndex = 0;
    this.inputIndex = 0; // index of the next input sample
    this.nextOutputAt = 0; // position of the next output sample, in input samples
    this.previous = 0; // filtered value of the previous input sample
    this.frame = new Float32Array(Math.round((targetRate * frameMs) / 1000));
    this.filled = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.post(this.filled);
        this.port.postMessage({ type: "flushed" });
      } else if (event.data === "stop") {
        this.running = false;
      }
    };
  }

  post(length) {
    if (length === 0) return;
    const frame = this.frame.slice(0, length);
    this.port.postMessage({ type: "frame", samples: frame }, [frame.buffer]);
    this.filled = 0;
  }

  filter(sample) {
    if (!this.taps) return sample;
    const { history, taps } = this;
    history[this.historyIndex] = sample;
    this.historyIndex = (this.historyIndex + 1) % history.length;
    // The filter is symmetric, so walking the ring from the oldest sample is a convolution.
    let acc = 0;
    let index = this.historyIndex;
    for (let i = 0; i < taps.length; i++) {
      acc += taps[i] * history[index];
      index = index + 1 === history.length ? 0 : index + 1;
    }
    return acc;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!this.running) return false;
    if (!channels || channels.length === 0) return true;
    const length = channels[0].length;
    for (let n = 0; n < length; n++) {
      let mixed = 0;
      for (let c = 0; c < channels.length; c++) mixed += channels[c][n];
      const current = this.filter(mixed / channels.length);
      // Emit every output instant between the previous input sample and this one.
      while (this.nextOutputAt <= this.inputIndex) {
        const fraction = 1 - (this.inputIndex - this.nextOutputAt);
        this.frame[this.filled++] = this.previous + (current - this.previous) * fraction;
        if (this.filled === this.frame.length) this.post(this.filled);
        this.nextOutputAt += this.ratio;
      }
      this.previous = current;
      this.inputIndex++;
    }
    return true;
  }
}

registerProcessor("streamscribe-capture", CaptureProcessor);
