// Inline SVG charts: a sparkline for the jobs list and a line chart with axes for the job page.

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function extent(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) { lo -= 0.5; hi += 0.5; } // a flat line sits in the middle
  return [lo, hi];
}

export function sparkline(values, label, { width = 120, height = 28 } = {}) {
  const box = svg('svg', { viewBox: `0 0 ${width} ${height}`, width, height, role: 'img', 'aria-label': label,
    class: 'sparkline' });
  if (values.length < 2) return box;
  const [lo, hi] = extent(values);
  const x = (i) => (i / (values.length - 1)) * (width - 4) + 2;
  const y = (v) => height - 2 - ((v - lo) / (hi - lo)) * (height - 4);
  const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(' ');
  box.append(svg('polyline', { points, fill: 'none', stroke: 'currentColor', 'stroke-width': 1.5 }));
  box.append(svg('circle', { cx: x(values.length - 1), cy: y(values.at(-1)), r: 2, fill: 'currentColor' }));
  return box;
}

// About five round tick values covering [lo, hi].
function ticks(lo, hi) {
  const step0 = (hi - lo) / 5;
  const magnitude = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function format(v) {
  if (v === 0) return '0';
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(1) : +v.toPrecision(3) + '';
}

// series: [{name, points: [[x, y], ...], colour}]; x is the step.
export function lineChart(series, { title, width = 560, height = 220 } = {}) {
  const pad = { left: 52, right: 14, top: 14, bottom: 30 };
  const all = series.flatMap((s) => s.points);
  const box = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title, class: 'chart' });
  box.append(svg('title', {}, title));
  if (!all.length) {
    box.append(svg('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle', class: 'chart-empty' },
      'No data yet'));
    return box;
  }
  const [x0, x1] = extent(all.map((p) => p[0]));
  const [y0, y1] = extent(all.map((p) => p[1]));
  const X = (v) => pad.left + ((v - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (v) => height - pad.bottom - ((v - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  for (const t of ticks(y0, y1)) {
    box.append(svg('line', { x1: pad.left, x2: width - pad.right, y1: Y(t), y2: Y(t), class: 'grid' }));
    box.append(svg('text', { x: pad.left - 6, y: Y(t) + 4, 'text-anchor': 'end', class: 'tick' }, format(t)));
  }
  for (const t of ticks(x0, x1).filter(Number.isInteger)) {
    box.append(svg('text', { x: X(t), y: height - pad.bottom + 16, 'text-anchor': 'middle', class: 'tick' }, t));
  }
  box.append(svg('text', { x: width - pad.right, y: height - 2, 'text-anchor': 'end', class: 'axis-label' }, 'step'));
  for (const s of series) {
    const points = s.points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(' ');
    box.append(svg('polyline', { points, fill: 'none', stroke: s.colour, 'stroke-width': 2,
      'stroke-linejoin': 'round', 'data-series': s.name }));
    if (s.points.length === 1 || s.markers) {
      for (const [x, y] of s.points) box.append(svg('circle', { cx: X(x), cy: Y(y), r: 3, fill: s.colour }));
    }
  }
  return box;
}
