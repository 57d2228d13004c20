// The live picture of the audio being sent: a log-frequency spectrum (up to 8 kHz, what a 16 kHz model
// hears) and a volume meter in dBFS with a falling peak marker.

const BANDS = 56;
const MIN_HZ = 60;
const MAX_HZ = 8000;
const FLOOR_DB = -90;
const METER_FLOOR_DB = -60;

/** In-place iterative radix-2 FFT of (re, im); length must be a power of two. */
function fft(re, im) {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) {
      [re[i], re[j]] = [re[j], re[i]];
      [im[i], im[j]] = [im[j], im[i]];
    }
  }
  for (let size = 2; size <= n; size <<= 1) {
    const angle = (-2 * Math.PI) / size;
    const stepRe = Math.cos(angle);
    const stepIm = Math.sin(angle);
    for (let start = 0; start < n; start += size) {
      let wRe = 1;
      let wIm = 0;
      for (let k = 0; k < size / 2; k++) {
        const a = start + k;
        const b = a + size / 2;
        const tRe = re[b] * wRe - im[b] * wIm;
        const tIm = re[b] * wIm + im[b] * wRe;
        re[b] = re[a] - tRe;
        im[b] = im[a] - tIm;
        re[a] += tRe;
        im[a] += tIm;
        const next = wRe * stepRe - wIm * stepIm;
        wIm = wRe * stepIm + wIm * stepRe;
        wRe = next;
      }
    }
  }
}

export class Visualizer {
  constructor(canvas, meter, meterFill, meterPeak) {
    this.canvas = canvas;
    this.meter = meter;
    this.meterFill = meterFill;
    this.meterPeak = meterPeak;
    this.source = null;
    this.levels = new Float32Array(BANDS);
    this.peakDb = METER_FLOOR_DB;
    this.frame = 0;
    this.lastAria = 0;
    this.reducedMotion = window.matchMedia?.("(prefers-reduced-motion: reduce)").matches ?? false;
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  /** Starts drawing from `source` (anything with sampleRate and readWindow(Float32Array)). */
  start(source) {
    this.source = source;
    const size = 2 ** Math.round(Math.log2(source.sampleRate * 0.043)); // ~43 ms windows
    this.window = new Float32Array(size);
    this.re = new Float32Array(size);
    this.im = new Float32Array(size);
    this.hann = Float32Array.from({ length: size }, (_, i) => 0.5 - 0.5 * Math.cos((2 * Math.PI * i) / size));
    const tick = () => {
      if (!this.source) return;
      this.analyse();
      this.draw();
      this.frame = requestAnimationFrame(tick);
    };
    cancelAnimationFrame(this.frame);
    this.frame = requestAnimationFrame(tick);
  }

  stop() {
    this.source = null;
    cancelAnimationFrame(this.frame);
    // Let the bars fall instead of freezing.
    const fall = () => {
      let moving = false;
      for (let i = 0; i < BANDS; i++) {
        this.levels[i] *= 0.85;
        if (this.levels[i] > 0.01) moving = true;
      }
      this.peakDb = Math.max(METER_FLOOR_DB, this.peakDb - 2);
      this.setMeter(METER_FLOOR_DB);
      this.draw();
      if (moving && !this.source) this.frame = requestAnimationFrame(fall);
    };
    this.frame = requestAnimationFrame(fall);
  }

  analyse() {
    const { window, re, im, hann } = this;
    this.source.readWindow(window);
    let energy = 0;
    for (let i = 0; i < window.length; i++) {
      energy += window[i] * window[i];
      re[i] = window[i] * hann[i];
      im[i] = 0;
    }
    const rmsDb = 10 * Math.log10(energy / window.length + 1e-12);
    this.setMeter(rmsDb);
    fft(re, im);
    const binHz = this.source.sampleRate / window.length;
    const norm = 2 / (window.length * 0.5); // Hann coherent gain is 0.5
    for (let band = 0; band < BANDS; band++) {
      const low = MIN_HZ * (MAX_HZ / MIN_HZ) ** (band / BANDS);
      const high = MIN_HZ * (MAX_HZ / MIN_HZ) ** ((band + 1) / BANDS);
      const first = Math.max(1, Math.floor(low / binHz));
      const last = Math.max(first, Math.min(window.length / 2 - 1, Math.ceil(high / binHz)));
      let peak = 0;
      for (let bin = first; bin <= last; bin++) peak = Math.max(peak, Math.hypot(re[bin], im[bin]) * norm);
      const db = 20 * Math.log10(peak + 1e-9);
      const target = Math.min(1, Math.max(0, (db - FLOOR_DB) / -FLOOR_DB));
      // Fast attack, slow release: readable and calm.
      this.levels[band] = target > this.levels[band] ? target : this.levels[band] * 0.8 + target * 0.2;
    }
  }

  setMeter(db) {
    const clamped = Math.max(METER_FLOOR_DB, Math.min(0, db));
    this.peakDb = clamped > this.peakDb ? clamped : Math.max(clamped, this.peakDb - 0.5);
    const toPercent = (value) => ((value - METER_FLOOR_DB) / -METER_FLOOR_DB) * 100;
    this.meterFill.style.clipPath = `inset(0 ${100 - toPercent(clamped)}% 0 0)`;
    this.meterPeak.style.left = `${toPercent(this.peakDb)}%`;
    this.meter.dataset.level = clamped > -6 ? "hot" : clamped > -40 ? "ok" : "quiet";
    const now = performance.now();
    if (now - this.lastAria > 500) {
      // Screen readers get a calm update twice a second, not sixty.
      this.lastAria = now;
      this.meter.setAttribute("aria-valuenow", clamped.toFixed(0));
      this.meter.setAttribute("aria-valuetext", clamped <= METER_FLOOR_DB ? "silent" : `${clamped.toFixed(0)} dB`);
    }
  }

  draw() {
    const { canvas } = this;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.round(canvas.clientWidth * ratio);
    const height = Math.round(canvas.clientHeight * ratio);
    if (!width || !height) return;
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = canvas.getContext("2d");
    const style = getComputedStyle(canvas);
    ctx.clearRect(0, 0, width, height);
    const gap = Math.max(1, Math.round(2 * ratio));
    const barWidth = (width - gap * (BANDS - 1)) / BANDS;
    const gradient = ctx.createLinearGradient(0, height, 0, 0);
    gradient.addColorStop(0, style.getPropertyValue("--bar-low").trim() || "#6366f1");
    gradient.addColorStop(1, style.getPropertyValue("--bar-high").trim() || "#22d3ee");
    ctx.fillStyle = style.getPropertyValue("--bar-idle").trim() || "#e5e7eb";
    const idle = Math.max(2 * ratio, height * 0.02);
    for (let band = 0; band < BANDS; band++) {
      const x = band * (barWidth + gap);
      ctx.fillRect(x, height - idle, barWidth, idle);
    }
    ctx.fillStyle = gradient;
    for (let band = 0; band < BANDS; band++) {
      const level = this.reducedMotion ? Math.round(this.levels[band] * 4) / 4 : this.levels[band];
      const barHeight = level * height;
      if (barHeight <= idle) continue;
      const x = band * (barWidth + gap);
      ctx.beginPath();
      ctx.roundRect(x, height - barHeight, barWidth, barHeight, [Math.min(barWidth / 2, 3 * ratio), Math.min(barWidth / 2, 3 * ratio), 0, 0]);
      ctx.fill();
    }
  }
}
