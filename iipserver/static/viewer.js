// A small pan/zoom viewer for IIP tile pyramids (JTL requests), written for iipserver.
// No dependencies. Resolution 0 is the smallest level; level sizes are floor-halvings of the
// full size; tiles are numbered row-major within a level.
"use strict";

(function () {
  const IIP = "iip";
  const MAX_TILES = 600; // decoded tiles kept in memory
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  const list = document.getElementById("images");
  const status = document.getElementById("status");
  const paramsInput = document.getElementById("params");

  let image = null; // {path, width, height, tw, th, levels: [{w, h, cols, rows}]}
  let scale = 1; // device pixels per full-resolution pixel
  let cx = 0; // full-resolution coordinates shown at the canvas centre
  let cy = 0;
  let extra = "";
  let tiles = new Map(); // "level,index" -> {img, loaded, failed, used}
  let frame = 0;
  let generation = 0; // bumped when the image or the parameters change
  let failures = 0;

  function setStatus(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", !!isError);
  }

  function requestDraw() {
    if (!frame) frame = requestAnimationFrame(draw);
  }

  function dpr() {
    return window.devicePixelRatio || 1;
  }

  function resize() {
    const rect = canvas.getBoundingClientRect();
    canvas.width = Math.max(1, Math.round(rect.width * dpr()));
    canvas.height = Math.max(1, Math.round(rect.height * dpr()));
    requestDraw();
  }

  // -- metadata --------------------------------------------------------------------------

  function parseMetadata(path, text) {
    const size = /Max-size:\s*(\d+)\s+(\d+)/i.exec(text);
    const tile = /Tile-size:\s*(\d+)\s+(\d+)/i.exec(text);
    const res = /Resolution-number:\s*(\d+)/i.exec(text);
    if (!size || !tile || !res) {
      throw new Error(text.trim().split("\n")[0] || "unexpected metadata response");
    }
    const width = +size[1];
    const height = +size[2];
    const tw = +tile[1];
    const th = +tile[2];
    const n = +res[1];
    const levels = [];
    for (let r = 0; r < n; r++) {
      const f = Math.pow(2, n - 1 - r);
      const w = Math.floor(width / f);
      const h = Math.floor(height / f);
      levels.push({ w: w, h: h, cols: Math.ceil(w / tw), rows: Math.ceil(h / th) });
    }
    return { path: path, width: width, height: height, tw: tw, th: th, levels: levels };
  }

  function fifUrl(path) {
    return IIP + "?FIF=" + encodeURIComponent(path);
  }

  function tileUrl(level, index) {
    return fifUrl(image.path) + (extra ? "&" + extra : "") + "&JTL=" + level + "," + index;
  }

  function open(path) {
    generation++;
    const mine = generation;
    tiles = new Map();
    image = null;
    failures = 0;
    requestDraw();
    for (const li of list.querySelectorAll("li")) {
      li.classList.toggle("selected", li.dataset.path === path);
    }
    history.replaceState(null, "", "#image=" + encodeURIComponent(path));
    setStatus("Loading " + path + "…");
    const url = fifUrl(path) + "&obj=IIP,1.0&obj=Max-size&obj=Tile-size&obj=Resolution-number";
    fetch(url)
      .then(function (response) {
        return response.text().then(function (text) {
          if (!response.ok) throw new Error(response.status + ": " + text.trim().split("\n")[0]);
          return text;
        });
      })
      .then(function (text) {
        if (mine !== generation) return;
        image = parseMetadata(path, text);
        fit();
      })
      .catch(function (err) {
        if (mine === generation) setStatus(path + ": " + err.message, true);
      });
  }

  // -- geometry --------------------------------------------------------------------------

  function fitScale() {
    if (!image) return 1;
    return Math.min(canvas.width / image.width, canvas.height / image.height);
  }

  function clampView() {
    if (!image) return;
    const fs = fitScale();
    scale = Math.min(Math.max(scale, fs / 4), 32 * dpr());
    cx = Math.min(Math.max(cx, 0), image.width);
    cy = Math.min(Math.max(cy, 0), image.height);
  }

  function fit() {
    if (!image) return;
    scale = fitScale();
    cx = image.width / 2;
    cy = image.height / 2;
    requestDraw();
  }

  // Zoom by `factor`, keeping the image point under canvas pixel (px, py) in place.
  function zoomAt(factor, px, py) {
    if (!image) return;
    const ix = cx + (px - canvas.width / 2) / scale;
    const iy = cy + (py - canvas.height / 2) / scale;
    scale *= factor;
    clampView();
    cx = ix - (px - canvas.width / 2) / scale;
    cy = iy - (py - canvas.height / 2) / scale;
    clampView();
    requestDraw();
  }

  // The smallest level that is not magnified on screen (or the full level).
  function chooseLevel() {
    const levels = image.levels;
    for (let r = 0; r < levels.length; r++) {
      if (levels[r].w > 0 && levels[r].w / image.width >= scale * 0.999) return r;
    }
    return levels.length - 1;
  }

  // -- tiles -----------------------------------------------------------------------------

  function getTile(level, index, fetchIt) {
    const key = level + "," + index;
    let tile = tiles.get(key);
    if (!tile && fetchIt) {
      tile = { img: new Image(), loaded: false, failed: false, used: 0 };
      const mine = generation;
      tile.img.onload = function () {
        tile.loaded = true;
        if (mine === generation) requestDraw();
      };
      tile.img.onerror = function () {
        tile.failed = true;
        if (mine === generation) {
          failures++;
          requestDraw();
        }
      };
      tile.img.src = tileUrl(level, index);
      tiles.set(key, tile);
    }
    if (tile) tile.used = performance.now();
    return tile;
  }

  function evict() {
    if (tiles.size <= MAX_TILES) return;
    const entries = Array.from(tiles.entries()).sort(function (a, b) {
      return a[1].used - b[1].used;
    });
    for (let i = 0; i < entries.length - MAX_TILES; i++) {
      const img = entries[i][1].img;
      img.onload = img.onerror = null;  // clearing src fires "error": not a failed tile
      img.src = "";
      tiles.delete(entries[i][0]);
    }
  }

  function drawLevel(r, fetchIt, x0, y0) {
    const level = image.levels[r];
    if (level.w === 0 || level.h === 0) return;
    const fx = level.w / image.width;
    const fy = level.h / image.height;
    const tw = image.tw;
    const th = image.th;
    // Visible part of the level, in level pixels.
    const lx0 = Math.max(0, x0 * fx);
    const ly0 = Math.max(0, y0 * fy);
    const lx1 = Math.min(level.w, (x0 + canvas.width / scale) * fx);
    const ly1 = Math.min(level.h, (y0 + canvas.height / scale) * fy);
    if (lx1 <= lx0 || ly1 <= ly0) return;
    const c0 = Math.floor(lx0 / tw);
    const c1 = Math.min(level.cols - 1, Math.floor((lx1 - 1e-9) / tw));
    const r0 = Math.floor(ly0 / th);
    const r1 = Math.min(level.rows - 1, Math.floor((ly1 - 1e-9) / th));
    for (let row = r0; row <= r1; row++) {
      for (let col = c0; col <= c1; col++) {
        const tile = getTile(r, row * level.cols + col, fetchIt);
        if (!tile || !tile.loaded) continue;
        const w = tile.img.naturalWidth;
        const h = tile.img.naturalHeight;
        // Tile corners in canvas pixels, rounded so that neighbours meet without seams.
        const sx0 = Math.round(((col * tw) / fx - x0) * scale);
        const sy0 = Math.round(((row * th) / fy - y0) * scale);
        const sx1 = Math.round(((col * tw + w) / fx - x0) * scale);
        const sy1 = Math.round(((row * th + h) / fy - y0) * scale);
        ctx.drawImage(tile.img, sx0, sy0, sx1 - sx0, sy1 - sy0);
      }
    }
  }

  function draw() {
    frame = 0;
    ctx.fillStyle = "#111417";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!image) return;
    const x0 = cx - canvas.width / (2 * scale);
    const y0 = cy - canvas.height / (2 * scale);
    const target = chooseLevel();
    ctx.imageSmoothingEnabled = scale < 2;
    // Coarser levels first, as placeholders: the smallest is always fetched, the others are
    // drawn only if still in memory from an earlier zoom.
    for (let r = 0; r <= target; r++) drawLevel(r, r === 0 || r === target, x0, y0);
    evict();
    const zoom = (100 * scale) / dpr();
    let text = image.path + " — " + image.width + " × " + image.height + " px, level " + target +
      "/" + (image.levels.length - 1) + ", zoom " + (zoom >= 10 ? zoom.toFixed(0) : zoom.toFixed(1)) + "%";
    if (failures) text += " — " + failures + " tile(s) failed";
    setStatus(text, failures > 0);
  }

  // -- image list ------------------------------------------------------------------------

  function showImages(entries) {
    list.textContent = "";
    if (!entries.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "No TIFF or FITS images under the data root.";
      list.appendChild(li);
      return;
    }
    for (const entry of entries) {
      const li = document.createElement("li");
      li.dataset.path = entry.path;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = entry.path;
      li.appendChild(name);
      if (entry.width && entry.height) {
        const size = document.createElement("span");
        size.className = "size";
        size.textContent = entry.width + " × " + entry.height;
        li.appendChild(size);
      }
      if (visiomatic) {
        const links = document.createElement("span");
        links.className = "links";
        const modes = (entry.channels || 1) > 1 ? ["mono", "color"] : ["mono"];
        for (const mode of modes) {
          const a = document.createElement("a");
          a.href = "visiomatic?image=" + encodeURIComponent(entry.path) + "&mode=" + mode;
          a.textContent = modes.length > 1 ? "VisiOmatic " + mode : "VisiOmatic";
          a.addEventListener("click", function (event) { event.stopPropagation(); });
          links.appendChild(a);
        }
        li.appendChild(links);
      }
      li.addEventListener("click", function () {
        open(entry.path);
      });
      list.appendChild(li);
    }
  }

  let visiomatic = false;

  function initialImage(entries) {
    const match = /(?:^|[#&])image=([^&]*)/.exec(location.hash);
    if (match) return decodeURIComponent(match[1]);
    return entries.length ? entries[0].path : null;
  }

  fetch("config")
    .then(function (response) { return response.ok ? response.json() : {}; })
    .catch(function () { return {}; })
    .then(function (config) {
      visiomatic = !!config.visiomatic;
      return fetch("images");
    })
    .then(function (response) {
      if (!response.ok) throw new Error("HTTP " + response.status);
      return response.json();
    })
    .then(function (data) {
      showImages(data.images);
      const first = initialImage(data.images);
      if (first) open(first);
    })
    .catch(function (err) {
      list.textContent = "";
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "Cannot list images: " + err.message;
      list.appendChild(li);
    });

  // -- interaction -----------------------------------------------------------------------

  function canvasPoint(event) {
    const rect = canvas.getBoundingClientRect();
    return [(event.clientX - rect.left) * dpr(), (event.clientY - rect.top) * dpr()];
  }

  canvas.addEventListener("wheel", function (event) {
    event.preventDefault();
    const unit = event.deltaMode === 1 ? 33 : event.deltaMode === 2 ? 400 : 1;
    const p = canvasPoint(event);
    zoomAt(Math.pow(1.0015, -event.deltaY * unit), p[0], p[1]);
  }, { passive: false });

  let drag = null;
  canvas.addEventListener("pointerdown", function (event) {
    drag = { id: event.pointerId, x: event.clientX, y: event.clientY };
    canvas.setPointerCapture(event.pointerId);
    canvas.classList.add("dragging");
  });
  canvas.addEventListener("pointermove", function (event) {
    if (!drag || event.pointerId !== drag.id || !image) return;
    cx -= ((event.clientX - drag.x) * dpr()) / scale;
    cy -= ((event.clientY - drag.y) * dpr()) / scale;
    drag.x = event.clientX;
    drag.y = event.clientY;
    clampView();
    requestDraw();
  });
  function endDrag() {
    drag = null;
    canvas.classList.remove("dragging");
  }
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", endDrag);
  canvas.addEventListener("dblclick", function (event) {
    const p = canvasPoint(event);
    zoomAt(event.shiftKey ? 0.5 : 2, p[0], p[1]);
  });

  function zoomCentre(factor) {
    zoomAt(factor, canvas.width / 2, canvas.height / 2);
  }
  document.getElementById("zoom-in").addEventListener("click", function () { zoomCentre(2); });
  document.getElementById("zoom-out").addEventListener("click", function () { zoomCentre(0.5); });
  document.getElementById("zoom-fit").addEventListener("click", fit);
  document.getElementById("zoom-one").addEventListener("click", function () {
    zoomCentre(dpr() / scale);
  });

  document.addEventListener("keydown", function (event) {
    if (event.target === paramsInput || !image) return;
    const step = 100 / scale;
    const actions = {
      "+": function () { zoomCentre(2); },
      "=": function () { zoomCentre(2); },
      "-": function () { zoomCentre(0.5); },
      "0": fit,
      "1": function () { zoomCentre(dpr() / scale); },
      ArrowLeft: function () { cx -= step; },
      ArrowRight: function () { cx += step; },
      ArrowUp: function () { cy -= step; },
      ArrowDown: function () { cy += step; },
    };
    const action = actions[event.key];
    if (!action) return;
    event.preventDefault();
    action();
    clampView();
    requestDraw();
  });

  paramsInput.addEventListener("change", function () {
    extra = paramsInput.value.trim().replace(/^[&?]+|&+$/g, "");
    if (image) {
      generation++;
      tiles = new Map();
      failures = 0;
      requestDraw();
    }
  });

  window.addEventListener("resize", resize);
  resize();
})();
