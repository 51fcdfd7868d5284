//! The admin web console: a static page (HTML, CSS, vanilla JS) embedded in
//! the binary and served by the admin listener at `/console/`.
//!
//! The page is only a client of the admin API on the same origin: it holds
//! the admin credential in `sessionStorage` and sends it as the bearer header,
//! so the console itself needs no session, cookie or CSRF token, and nothing
//! here authorizes anything — every action is checked (and audited) by the API.
//!
//! The assets are `include_str!`ed rather than read from disk so the one
//! binary is the whole deployment (no asset directory to mount, nothing to
//! build on the user's side), and what a test serves is what ships.
//!
//! Every console response carries a strict Content-Security-Policy: scripts
//! only from this origin (no inline script, no `eval`), styles only from this
//! origin, requests only back to this origin, no framing. Combined with the
//! script never using `innerHTML` on server data, injected markup in job args
//! or error texts stays text.
use crate::error::Error;
use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::web::Path;
use poem::{Endpoint, EndpointExt, IntoResponse, Response, Route, get, handler};

const INDEX_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/console.js");
const PANELS_JS: &str = include_str!("../console/panels.js");
const CONSOLE_CSS: &str = include_str!("../console/console.css");
const FAVICON_SVG: &str = include_str!("../console/favicon.svg");
const SVG: &str = "image/svg+xml";

/// The policy every console response is served with.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; \
     base-uri 'none'; frame-ancestors 'none'";

/// The console's route templates, for metrics labels.
pub(crate) const ROUTES: &[&str] = &[
    "/",
    "/console",
    "/console/",
    "/console/{asset}",
    "/favicon.ico",
];

/// The routes to mount on the admin listener: `/console` redirects to
/// `/console/`, which serves the page; `/console/{asset}` its script, style
/// and icon. `/favicon.ico` serves the icon too: browsers ask for it on
/// their own, and its 404 was a console error on every load.
pub fn routes(route: Route) -> Route {
    route
        .at("/console", get(to_console))
        .at("/console/", get(index))
        .at("/console/:asset", get(asset))
        .at("/favicon.ico", get(favicon))
}

#[handler]
fn favicon() -> Response {
    served(FAVICON_SVG, SVG)
}

/// Wraps the admin app so that `GET /` redirects to the console. (A `Route`
/// entry for `/` would lose to the API service nested at `/`, which claims
/// the bare root too.)
pub fn with_root_redirect<E: Endpoint + 'static>(ep: E) -> impl Endpoint<Output = Response> {
    ep.around(|ep, req| async move {
        if req.uri().path() == "/" && req.method() == Method::GET {
            return Ok(redirect("./console/"));
        }
        ep.call(req).await.map(IntoResponse::into_response)
    })
}

/// Redirects to the page. The target is relative to the request path's
/// directory, so it also works behind an ingress that mounts the admin
/// listener under a path prefix.
#[handler]
fn to_console() -> Response {
    // `/console` → `console/`: relative to the parent, i.e. `/console/`.
    redirect("console/")
}

fn redirect(target: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, target)
        .finish()
}

#[handler]
fn index() -> Response {
    served(INDEX_HTML, "text/html; charset=utf-8")
}

#[handler]
fn asset(Path(name): Path<String>) -> poem::Result<Response> {
    match name.as_str() {
        "console.js" => Ok(served(CONSOLE_JS, "text/javascript; charset=utf-8")),
        "panels.js" => Ok(served(PANELS_JS, "text/javascript; charset=utf-8")),
        "console.css" => Ok(served(CONSOLE_CSS, "text/css; charset=utf-8")),
        "favicon.svg" => Ok(served(FAVICON_SVG, SVG)),
        _ => Err(Error::NotFound("no such console asset".into()).into()),
    }
}

/// A console response with its security headers. `no-cache` (revalidate)
/// rather than long caching, so a deploy never mixes old and new assets.
fn served(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.with_content_type(content_type).into_response();
    let headers = resp.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ] {
        headers.insert(name, value);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page must load only what the policy allows: its own script and
    /// style by relative URL, and no inline script or handler attributes.
    #[test]
    fn page_fits_its_policy() {
        assert!(INDEX_HTML.contains(r#"<script src="console.js" defer></script>"#));
        assert!(INDEX_HTML.contains(r#"<script src="panels.js" defer></script>"#));
        assert!(INDEX_HTML.contains(r#"href="console.css""#));
        // Exactly these two scripts, both from this origin, in this order
        // (panels.js uses what console.js defines).
        assert_eq!(INDEX_HTML.matches("<script").count(), 2);
        assert!(INDEX_HTML.find("console.js") < INDEX_HTML.find("panels.js"));
        assert!(INDEX_HTML.contains(r#"<link rel="icon" href="favicon.svg""#));
        let handler_attribute = INDEX_HTML
            .split(|c: char| c.is_whitespace() || c == '<')
            .find(|w| w.starts_with("on") && w.contains('='));
        assert_eq!(handler_attribute, None);
        assert!(!INDEX_HTML.contains("style="));
    }

    /// `/` and `/console` lead to the page (relative targets), the page and
    /// its assets carry the policy, and anything else under `/console/` is a
    /// 404 problem; the rest still reaches the app behind.
    #[tokio::test]
    async fn serves_the_page_with_its_policy() {
        use poem::test::TestClient;
        let api = poem::endpoint::make_sync(|_| "api");
        let app = with_root_redirect(routes(Route::new()).nest("/", api));
        let client = TestClient::new(app);

        for (path, location) in [("/", "./console/"), ("/console", "console/")] {
            let resp = client.get(path).send().await;
            resp.assert_status(StatusCode::SEE_OTHER);
            resp.assert_header(header::LOCATION, location);
        }
        for (path, ty) in [
            ("/console/", "text/html; charset=utf-8"),
            ("/console/console.js", "text/javascript; charset=utf-8"),
            ("/console/panels.js", "text/javascript; charset=utf-8"),
            ("/console/console.css", "text/css; charset=utf-8"),
            ("/console/favicon.svg", "image/svg+xml"),
            ("/favicon.ico", "image/svg+xml"),
        ] {
            let resp = client.get(path).send().await;
            resp.assert_status_is_ok();
            resp.assert_content_type(ty);
            resp.assert_header(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY);
            resp.assert_header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
        }
        // Assets are a closed list of names, never a file path.
        let resp = client.get("/console/..%2f..%2fetc%2fpasswd").send().await;
        resp.assert_status(StatusCode::NOT_FOUND);
        let resp = client.get("/console/index.html.bak").send().await;
        resp.assert_status(StatusCode::NOT_FOUND);
        client.get("/v1/jobs").send().await.assert_text("api").await;
    }

    /// Server text reaches the page through `visible`, which shows hidden
    /// characters (bidi overrides, zero-width, controls) as escapes, and
    /// cells are bidi isolates.
    #[test]
    fn script_shows_hidden_characters() {
        assert!(CONSOLE_JS.contains("createTextNode(visible(child))"));
        assert!(CONSOLE_JS.contains("node.textContent = visible(value)"));
        for range in [
            "\\u202A-\\u202E",
            "\\u2066-\\u206F",
            "\\u200B-\\u200F",
            "\\u0000-\\u0008",
        ] {
            assert!(CONSOLE_JS.contains(range), "HIDDEN lacks {range}");
        }
        assert!(CONSOLE_CSS.contains("unicode-bidi: isolate"));
    }

    /// The scripts never parse server data as markup.
    #[test]
    fn script_never_uses_markup_sinks() {
        for (name, script) in [("console.js", CONSOLE_JS), ("panels.js", PANELS_JS)] {
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
            ] {
                assert!(!script.contains(sink), "{name} uses {sink}");
            }
        }
    }
}
