// rlhfkit: markdown, code fences and chat turns, rendered safely. marked parses, every raw HTML
// token is shown as text (a model that writes "<div>" should be judged on what it wrote), and
// DOMPurify sanitises the result before it touches the page. Both libraries are vendored.
"use strict";

const RLHFKIT_RENDER = (() => {
  const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  marked.use({ gfm: true, breaks: true, renderer: { html(token) { return esc(token.text); } } });
  const PURIFY = {
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "svg", "math",
                  "video", "audio", "object", "embed"],
    FORBID_ATTR: ["style"],
  };
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
  });

  function markdown(text) {
    return DOMPurify.sanitize(marked.parse(String(text)), PURIFY);
  }

  // Chat turns: a JSON list of {role, content}, ChatML (<|im_start|>role ... <|im_end|>), or
  // hh-rlhf style "Human: ... Assistant: ...". Anything else is one markdown block.
  function turns(text) {
    const t = String(text);
    const s = t.trim();
    if (s.startsWith("[")) {
      try {
        const msgs = JSON.parse(s);
        if (Array.isArray(msgs) && msgs.length && msgs.every((m) => m && typeof m.role === "string" && "content" in m))
          return msgs.map((m) => ({ role: m.role, content: String(m.content) }));
      } catch (e) { /* not JSON: plain text */ }
    }
    if (s.includes("<|im_start|>")) {
      const out = [];
      const re = /<\|im_start\|>(\w+)\n?([\s\S]*?)(?:<\|im_end\|>|(?=<\|im_start\|>)|$)/g;
      let m;
      while ((m = re.exec(s)) !== null) { if (m[0]) out.push({ role: m[1], content: m[2].trim() }); if (!m[0]) re.lastIndex++; }
      if (out.length) return out;
    }
    const hh = /(?:^|\n\n)(Human|Assistant|User|System):[ \t]?/g;
    if (/^(Human|Assistant|User|System):/.test(s)) {
      const out = [];
      const parts = s.split(hh);  // ["", role, text, role, text, ...]
      for (let i = 1; i < parts.length; i += 2) out.push({ role: parts[i].toLowerCase(), content: parts[i + 1].trim() });
      if (out.length) return out;
    }
    return null;
  }

  // Fill `el` with the rendered text: chat turns as labelled blocks, else markdown.
  function render(el, text) {
    const chat = turns(text);
    el.replaceChildren();
    if (!chat) { el.innerHTML = markdown(text); return; }
    for (const m of chat) {
      const turn = document.createElement("div");
      turn.className = "turn role-" + m.role.replace(/[^a-z]/gi, "");
      const who = document.createElement("div");
      who.className = "role"; who.textContent = m.role;
      const body = document.createElement("div");
      body.className = "content"; body.innerHTML = markdown(m.content);
      turn.append(who, body);
      el.appendChild(turn);
    }
  }

  return { markdown, turns, render };
})();
