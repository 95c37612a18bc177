//! Writing the pages: escaping, the layout every page shares (nav, flash,
//! error), tables, paging links and the confirmation page.

use std::fmt::Write as _;

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use super::Ctx;

/// `s` with `& < > " '` escaped: safe in element text and in quoted
/// attribute values; control characters other than newline and tab are
/// written as the command line writes them (`\u{0}`, `\u{1b}`), never raw.
/// Every piece of user or cluster data goes through it.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // A control character is no text (a NUL is not even allowed
            // in a page): written escaped, as the command line writes it.
            c if c.is_control() && c != '\n' && c != '\t' => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

/// `s` percent-encoded for a URL path segment or query value.
pub fn url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// What a page shows after an action: done, or refused.
#[derive(Debug, Clone)]
pub enum Flash {
    /// The action was done (`div.flash`).
    Done(String),
    /// It was refused or failed (`div.error`).
    Failed(String),
}

/// `<div class="error">`.
pub fn error_div(text: &str) -> String {
    format!("<div class=\"error\">{}</div>", esc(text))
}

const NAV: [(&str, &str, &str); 6] = [
    ("nav-overview", "/", "Overview"),
    ("nav-topics", "/topics", "Topics"),
    ("nav-groups", "/groups", "Consumer groups"),
    ("nav-transactions", "/transactions", "Transactions"),
    ("nav-messages", "/messages", "Messages"),
    ("nav-dlq", "/dead-letters", "Dead letters"),
];

/// A whole page: head, nav (`active` is the nav id to mark), the session's
/// pending flash, then `body`.
pub fn page(ctx: &Ctx, status: StatusCode, title: &str, active: &str, body: &str) -> Response {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{} · txmq</title><link rel=\"stylesheet\" href=\"/assets/dashboard.css\">\
<script src=\"/assets/dashboard.js\" defer></script></head><body><header><span class=\"brand\">txmq</span><nav>",
        esc(title)
    );
    for (id, href, label) in NAV {
        let class = if id == active {
            " class=\"active\""
        } else {
            ""
        };
        let _ = write!(out, "<a id=\"{id}\" href=\"{href}\"{class}>{label}</a>");
    }
    out.push_str("</nav>");
    if let Some(user) = &ctx.user {
        let _ = write!(
            out,
            "<form class=\"logout\" method=\"post\" action=\"/logout\">{}<span class=\"user\">{}</span> <button type=\"submit\" id=\"logout\">Sign out</button></form>",
            ctx.csrf_input(),
            esc(user)
        );
    }
    let _ = write!(out, "</header><main><h1>{}</h1>", esc(title));
    match ctx.session.take_flash() {
        Some(Flash::Done(text)) => {
            let _ = write!(out, "<div class=\"flash\">{}</div>", esc(&text));
        }
        Some(Flash::Failed(text)) => out.push_str(&error_div(&text)),
        None => {}
    }
    out.push_str(body);
    out.push_str("</main></body></html>\n");
    (status, Html(out)).into_response()
}

/// A page that only says what went wrong, with `status`.
pub fn error_page(ctx: &Ctx, status: StatusCode, title: &str, text: &str) -> Response {
    page(ctx, status, title, "", &error_div(text))
}

/// A table: `attrs` go on `<table>` (an id), `head` are the column names,
/// each row is `(tr attributes, cells as HTML)`.
pub fn table(attrs: &str, head: &[&str], rows: &[(String, Vec<String>)]) -> String {
    let mut out = format!("<table {attrs}><thead><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for (tr, cells) in rows {
        let _ = write!(out, "<tr {tr}>");
        for c in cells {
            if c.starts_with("<td") {
                out.push_str(c);
            } else {
                let _ = write!(out, "<td>{c}</td>");
            }
        }
        out.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(
            out,
            "<tr class=\"empty\"><td colspan=\"{}\">none</td></tr>",
            head.len()
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// The rows of page `page` (from 1) of `items`, `size` a page.
pub fn paged<T>(items: &[T], page: usize, size: usize) -> &[T] {
    let start = page.saturating_sub(1).saturating_mul(size).min(items.len());
    let end = start.saturating_add(size).min(items.len());
    &items[start..end]
}

/// `a.prev` / `a.next` links around page `page` of `total` items; `query`
/// is the rest of the query string (already URL-encoded, `&`-joined).
pub fn pager(path: &str, query: &str, page: usize, size: usize, total: usize) -> String {
    let pages = total.div_ceil(size.max(1)).max(1);
    let join = if query.is_empty() { "" } else { "&amp;" };
    let mut out = String::from("<div class=\"pager\">");
    // A page past the end (an old link, a typed URL) links to the last.
    let past = page > pages;
    if page > 1 {
        let _ = write!(
            out,
            "<a class=\"prev\" href=\"{path}?{}{join}page={}\">{}</a> ",
            esc(query),
            if past { pages } else { page - 1 },
            if past { "last page" } else { "previous" }
        );
    }
    let _ = write!(
        out,
        "<span class=\"page\">page {page} of {pages} ({total} in all{})</span>",
        if past { ": past the last page" } else { "" }
    );
    if page < pages {
        let _ = write!(
            out,
            " <a class=\"next\" href=\"{path}?{}{join}page={}\">next</a>",
            esc(query),
            page + 1
        );
    }
    out.push_str("</div>");
    out
}

/// A confirmation page: `p#confirm-text` says exactly what will happen, and
/// a POST form to `action` (with `fields` as hidden inputs) whose button is
/// `button#confirm`; "cancel" goes back to `back`.
pub fn confirm(
    ctx: &Ctx,
    title: &str,
    active: &str,
    text: &str,
    action: &str,
    fields: &[(&str, &str)],
    back: &str,
) -> Response {
    let mut body = format!(
        "<p id=\"confirm-text\">{}</p><form id=\"confirm-form\" method=\"post\" action=\"{}\">{}",
        esc(text),
        esc(action),
        ctx.csrf_input()
    );
    for (name, value) in fields {
        let _ = write!(
            body,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(name),
            esc(value)
        );
    }
    let _ = write!(
        body,
        "<button type=\"submit\" id=\"confirm\">Yes, do it</button> <a id=\"cancel\" href=\"{}\">Cancel</a></form>",
        esc(back)
    );
    page(ctx, StatusCode::OK, title, active, &body)
}

/// Milliseconds as a short age: `850 ms`, `12.3 s`, `4 min 2 s`, `3 h 5 min`.
pub fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup_and_urls_no_separators() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(esc("a\0b\x1b[1m\r\nc\td"), "a\\u{0}b\\u{1b}[1m\\r\nc\td");
        assert_eq!(url("a b/c%d?e&f"), "a%20b%2Fc%25d%3Fe%26f");
        assert_eq!(url("%DLQ%g-1"), "%25DLQ%25g-1");
    }

    #[test]
    fn pages_cut_the_list_and_link_only_where_there_is_more() {
        let items: Vec<u32> = (0..120).collect();
        assert_eq!(paged(&items, 1, 50), &items[..50]);
        assert_eq!(paged(&items, 3, 50), &items[100..]);
        assert!(paged(&items, 9, 50).is_empty());
        assert!(paged(&items, 0, 50) == &items[..50]);
        let first = pager("/topics", "q=a", 1, 50, 120);
        assert!(
            first.contains("class=\"next\" href=\"/topics?q=a&amp;page=2\""),
            "{first}"
        );
        assert!(!first.contains("class=\"prev\""), "{first}");
        let last = pager("/topics", "", 3, 50, 120);
        assert!(
            last.contains("class=\"prev\" href=\"/topics?page=2\""),
            "{last}"
        );
        assert!(!last.contains("class=\"next\""), "{last}");
        let past = pager("/topics", "", 999, 50, 120);
        assert!(
            past.contains("class=\"prev\" href=\"/topics?page=3\">last page</a>"),
            "{past}"
        );
        assert!(
            past.contains("page 999 of 3 (120 in all: past the last page)"),
            "{past}"
        );
        assert!(!past.contains("class=\"next\""), "{past}");
    }

    #[test]
    fn ages_and_sizes_read_in_human_units() {
        assert_eq!(age(850), "850 ms");
        assert_eq!(age(12_300), "12.3 s");
        assert_eq!(age(242_000), "4 min 2 s");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
