// The ranking page of `align label`. Everything the server sends is shown with textContent, never as HTML.
"use strict";

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const LETTERS = "ABCDEFGHI";
  const NAME_KEY = "align-label-name";

  let labeler = localStorage.getItem(NAME_KEY) || "";
  let item = null; // {id, prompt: [{role, content}], responses: [{index, text}] in the order shown}
  let ranks = {}; // response index -> rank number (1 = best); equal numbers are a tie
  let focused = null; // response index of the focused card
  let busy = false;

  // ------------------------------------------------------------------ talking to the server

  async function call(path, body) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    });
    let data = {};
    try {
      data = await response.json();
    } catch (error) {
      data = {};
    }
    if (!response.ok && response.status !== 409) {
      throw new Error(data.error || `the server answered ${response.status}`);
    }
    return data;
  }

  // Returns whether the server took the request (a failed submission keeps the item and its draft on screen).
  async function send(path, body) {
    if (busy) return false;
    busy = true;
    say("");
    try {
      show(await call(path, { labeler, ...body }));
      return true;
    } catch (error) {
      say(`Not saved: ${error.message}. Check that \`align label\` is still running, then try again.`);
      return false;
    } finally {
      busy = false;
    }
  }

  const draftKey = () => `align-label-draft:${labeler}:${item.id}`;
  const saveDraft = () => item && sessionStorage.setItem(draftKey(), JSON.stringify(ranks));

  // ------------------------------------------------------------------ showing an item

  function show(data) {
    if (data.progress) showProgress(data.progress);
    $("flag-form").hidden = true;
    if (!data.item) {
      item = null;
      $("item").hidden = true;
      $("done").hidden = false;
      $("done-title").textContent = data.finished ? "Every item is ranked. Thank you!" : "Nothing left for you to rank";
      $("done-text").textContent = data.finished
        ? "The round is complete: the server has stopped and written the dataset."
        : "The remaining items wait for other people (or are open on someone's screen). Look again later: an item " +
          "left open too long is given out again.";
      $("look-again").hidden = Boolean(data.finished);
      return;
    }
    item = data.item;
    ranks = {};
    try {
      const draft = JSON.parse(sessionStorage.getItem(draftKey()) || "{}");
      for (const r of item.responses) if (Number.isInteger(draft[r.index])) ranks[r.index] = draft[r.index];
    } catch (error) {
      ranks = {};
    }
    $("done").hidden = true;
    $("item").hidden = false;
    $("item-id").textContent = `(${item.id})`;
    const prompt = $("prompt");
    prompt.replaceChildren();
    for (const turn of item.prompt) {
      const block = document.createElement("div");
      block.className = `turn ${turn.role === "user" ? "user" : "other"}`;
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = turn.role;
      block.append(role, document.createTextNode(turn.content));
      prompt.append(block);
    }
    focused = firstUnranked(null);
    if (focused === null) focused = item.responses[0].index;
    render();
    window.scrollTo(0, 0);
  }

  function showProgress(p) {
    $("progress-box").hidden = false;
    $("progress").max = Math.max(1, p.judgements_needed);
    $("progress").value = p.judgements;
    $("progress-text").textContent =
      `${p.complete} of ${p.items} items complete · you: ${p.ranked_by_you} ranked, ` +
      `${p.skipped_by_you} skipped, ${p.flagged_by_you} flagged`;
  }

  function letter(index) {
    const position = item.responses.findIndex((r) => r.index === index);
    return LETTERS[position];
  }

  function displayOrder() {
    const ranked = item.responses
      .filter((r) => ranks[r.index] != null)
      .sort((a, b) => ranks[a.index] - ranks[b.index] || letter(a.index).localeCompare(letter(b.index)));
    const unranked = item.responses.filter((r) => ranks[r.index] == null);
    return { ranked, unranked };
  }

  function render() {
    const { ranked, unranked } = displayOrder();
    const k = item.responses.length;
    const counts = {};
    for (const r of ranked) counts[ranks[r.index]] = (counts[ranks[r.index]] || 0) + 1;
    const list = (element, responses) => element.replaceChildren(...responses.map((r) => card(r, k, counts)));
    list($("ranked"), ranked);
    list($("unranked"), unranked);
    $("ranked-empty").hidden = ranked.length > 0;
    $("unranked-zone").hidden = unranked.length === 0;
    $("submit").disabled = unranked.length > 0;
    const element = document.querySelector(`.card[data-index="${focused}"]`);
    if (element && !$("flag-form").contains(document.activeElement)) element.focus({ preventScroll: false });
  }

  function card(response, k, counts) {
    const li = document.createElement("li");
    li.className = "card";
    li.tabIndex = 0;
    li.dataset.index = String(response.index);
    const rank = ranks[response.index];
    if (rank != null && counts[rank] > 1) li.classList.add("tied");
    li.setAttribute("aria-label", `Response ${letter(response.index)}` + (rank != null ? `, rank ${rank}` : ", not ranked"));
    const badge = document.createElement("div");
    badge.className = "badge";
    badge.textContent = rank != null ? String(rank) : "–";
    const small = document.createElement("small");
    small.textContent = rank != null && counts[rank] > 1 ? `tie · ${letter(response.index)}` : letter(response.index);
    badge.append(small);
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = response.text === "" ? "(empty response)" : response.text;
    const buttons = document.createElement("div");
    buttons.className = "rank-buttons";
    for (let n = 1; n <= k; n += 1) {
      const button = document.createElement("button");
      button.type = "button";
      button.tabIndex = -1;
      button.textContent = String(n);
      button.title = `rank ${n}`;
      if (rank === n) button.classList.add("chosen");
      button.addEventListener("click", () => setRank(response.index, n));
      buttons.append(button);
    }
    li.append(badge, text, buttons);
    li.addEventListener("pointerdown", startDrag);
    li.addEventListener("focus", () => {
      focused = response.index;
    });
    return li;
  }

  function firstUnranked(after) {
    const order = item.responses.map((r) => r.index);
    const start = after === null ? 0 : order.indexOf(after) + 1;
    for (let step = 0; step < order.length; step += 1) {
      const index = order[(start + step) % order.length];
      if (ranks[index] == null) return index;
    }
    return null;
  }

  function setRank(index, rank) {
    if (rank === null) delete ranks[index];
    else ranks[index] = rank;
    saveDraft();
    const next = rank === null ? null : firstUnranked(index);
    focused = next === null ? index : next;
    say("");
    render();
  }

  function say(text) {
    $("message").textContent = text;
  }

  // ------------------------------------------------------------------ submitting

  function submitRanking() {
    if (!item || busy) return;
    const left = item.responses.filter((r) => ranks[r.index] == null).length;
    if (left > 0) {
      say(`Rank every response first (${left} left), or skip the item.`);
      return;
    }
    const values = item.responses.map((r) => ranks[r.index]);
    if (new Set(values).size === 1) {
      say("Every response is tied: a ranking needs at least one preference. Rank them, or skip the item.");
      return;
    }
    const ordered = [...item.responses].sort((a, b) => a.index - b.index).map((r) => ranks[r.index]);
    const key = draftKey();
    send("/api/submit", { item: item.id, action: "rank", ranks: ordered }).then((taken) => {
      if (taken) sessionStorage.removeItem(key);
    });
  }

  function skip() {
    if (item) send("/api/submit", { item: item.id, action: "skip" });
  }

  function openFlag() {
    if (!item) return;
    $("flag-form").hidden = false;
    $("flag-note").focus();
  }

  function closeFlag() {
    $("flag-form").hidden = true;
    render();
  }

  $("flag-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const reason = document.querySelector('input[name="flag-reason"]:checked').value;
    const note = $("flag-note").value.trim();
    $("flag-note").value = "";
    send("/api/submit", { item: item.id, action: "flag", reason, note: note || null });
  });
  $("flag-cancel").addEventListener("click", closeFlag);
  $("submit").addEventListener("click", submitRanking);
  $("skip").addEventListener("click", skip);
  $("flag").addEventListener("click", openFlag);

  // ------------------------------------------------------------------ keyboard

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (!$("flag-form").hidden) {
      if (event.key === "Escape") {
        event.preventDefault();
        closeFlag();
      }
      return; // typing a note
    }
    if (!item || $("item").hidden || event.target.closest("input, textarea, select")) return;
    const { ranked, unranked } = displayOrder();
    const order = [...ranked, ...unranked].map((r) => r.index);
    const k = item.responses.length;
    let handled = true;
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      const at = Math.max(0, order.indexOf(focused));
      const to = event.key === "ArrowDown" ? Math.min(order.length - 1, at + 1) : Math.max(0, at - 1);
      focused = order[to];
      render();
    } else if (/^[1-9]$/.test(event.key) && Number(event.key) <= k) {
      if (focused !== null) setRank(focused, Number(event.key));
    } else if (event.key === "0" || event.key === "Backspace" || event.key === "Delete") {
      if (focused !== null) setRank(focused, null);
    } else if (event.key === "Enter") {
      submitRanking();
    } else if (event.key === "s" || event.key === "S") {
      skip();
    } else if (event.key === "f" || event.key === "F") {
      openFlag();
    } else {
      handled = false;
    }
    if (handled) event.preventDefault();
  });

  // ------------------------------------------------------------------ dragging (pointer events: mouse, pen, touch)

  let drag = null;

  function startDrag(event) {
    if (event.button !== 0 || event.target.closest("button")) return;
    const element = event.currentTarget;
    drag = { index: Number(element.dataset.index), element, x: event.clientX, y: event.clientY, moved: false };
  }

  function clearMarks() {
    for (const element of document.querySelectorAll(".drop-before, .drop-after, .drop-tie, .drop-here")) {
      element.classList.remove("drop-before", "drop-after", "drop-tie", "drop-here");
    }
  }

  // Where a drop at (x, y) puts the dragged response: before / after / tied with a ranked card, at the end
  // of the ranking, or back among the unranked.
  function dropTarget(x, y) {
    const under = document.elementFromPoint(x, y);
    if (!under) return null;
    const target = under.closest(".card");
    if (target && $("ranked").contains(target)) {
      const box = target.getBoundingClientRect();
      const at = (y - box.top) / box.height;
      const kind = at < 0.3 ? "before" : at > 0.7 ? "after" : "tie";
      return { kind, other: Number(target.dataset.index), element: target };
    }
    if (under.closest("#ranked-zone")) {
      const below = [...$("ranked").children].find((element) => {
        const box = element.getBoundingClientRect();
        return box.top + box.height / 2 > y && Number(element.dataset.index) !== drag.index;
      });
      return below
        ? { kind: "before", other: Number(below.dataset.index), element: below }
        : { kind: "end", element: $("ranked-zone") };
    }
    if (under.closest("#unranked-zone")) return { kind: "unrank", element: $("unranked-zone") };
    return null;
  }

  document.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    if (!drag.moved && Math.hypot(dx, dy) < 6) return;
    if (!drag.moved) {
      drag.moved = true;
      drag.element.classList.add("dragging");
      document.body.classList.add("dragging-active");
      window.getSelection().removeAllRanges();
    }
    drag.element.style.transform = `translate(${dx}px, ${dy}px)`;
    clearMarks();
    const target = dropTarget(event.clientX, event.clientY);
    if (target) {
      const mark = { before: "drop-before", after: "drop-after", tie: "drop-tie" }[target.kind] || "drop-here";
      target.element.classList.add(mark);
    }
    event.preventDefault();
  });

  function endDrag(event) {
    if (!drag) return;
    const current = drag;
    const target = current.moved && event.type === "pointerup" ? dropTarget(event.clientX, event.clientY) : null;
    drag = null;
    clearMarks();
    current.element.style.transform = "";
    current.element.classList.remove("dragging");
    document.body.classList.remove("dragging-active");
    if (!current.moved) {
      focused = current.index;
      return;
    }
    if (target) place(current.index, target);
    focused = current.index;
    render();
  }

  document.addEventListener("pointerup", endDrag);
  document.addEventListener("pointercancel", endDrag);

  // The ranking as groups of tied responses, best first, without `index`; then `index` put where it was
  // dropped, and every rank renumbered 1, 2, ... by group.
  function place(index, target) {
    const others = item.responses.filter((r) => r.index !== index && ranks[r.index] != null);
    const values = [...new Set(others.map((r) => ranks[r.index]))].sort((a, b) => a - b);
    const groups = values.map((v) => others.filter((r) => ranks[r.index] === v).map((r) => r.index));
    const group = groups.findIndex((g) => g.includes(target.other));
    if (target.kind === "tie") groups[group].push(index);
    else if (target.kind === "before") groups.splice(group, 0, [index]);
    else if (target.kind === "after") groups.splice(group + 1, 0, [index]);
    else if (target.kind === "end") groups.push([index]);
    for (const r of item.responses) delete ranks[r.index];
    groups.forEach((g, position) => g.forEach((i) => (ranks[i] = position + 1)));
    saveDraft();
  }

  // ------------------------------------------------------------------ the labeler's name

  function askName() {
    $("item").hidden = true;
    $("done").hidden = true;
    $("who").hidden = true;
    $("name-form").hidden = false;
    $("name-input").value = labeler;
    $("name-input").focus();
  }

  function start() {
    $("name-form").hidden = true;
    $("who").hidden = false;
    $("labeler-name").textContent = labeler;
    send("/api/next", {});
  }

  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name-input").value.trim();
    if (!name) return;
    labeler = name;
    localStorage.setItem(NAME_KEY, labeler);
    start();
  });
  $("change-name").addEventListener("click", askName);
  $("look-again").addEventListener("click", () => send("/api/next", {}));

  if (labeler) start();
  else askName();
})();
