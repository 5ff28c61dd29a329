// Answers are Markdown, written by models: this file is the one place that turns them into
// HTML, for the page (app.js) and the operators' console (admin.js). marked renders and
// DOMPurify sanitizes the HTML before it reaches the document, so no answer can run code.
"use strict";

// Links from answers open in a new tab and tell the target nothing about this page.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

const SANITIZE = {
  USE_PROFILES: { html: true }, // no SVG or MathML
  // No images (see below); forms and styles have no place in an answer (and inline styles
  // would only trip the CSP).
  FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select"],
  FORBID_ATTR: ["style"],
  // A fragment, not a string: what is inserted is exactly the tree DOMPurify checked.
  RETURN_DOM_FRAGMENT: true,
};

// HTML written by a model is shown as text, never parsed: an answer that explains HTML reads
// as intended, and no hostile markup ever reaches a DOM parser (where Chrome would already
// report the inline handlers it blocks). DOMPurify still checks everything marked writes,
// such as `[x](javascript:…)` links.
const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
// Images become links to them: an image would make the browser fetch a URL an answer chose.
marked.use({
  renderer: {
    html: ({ text }) => escapeHtml(text),
    image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
  },
});

/** Replaces `el`'s children with `text` rendered as Markdown and sanitized. */
function renderMarkdown(el, text) {
  const html = marked.parse(text, { gfm: true, async: false });
  el.replaceChildren(DOMPurify.sanitize(html, SANITIZE));
}
