//! What `/ready` answers: whether this box should get traffic, decided from the routes
//! and the state of the backends behind them, as a pure function so every case is a test.
//!
//! The box is ready when every route has a usable target. A remote is usable while it is
//! configured: its breaker says whether to call it *now*, and a gateway that is down is
//! exactly what the local model is for, so a breaker never takes the box out of service.
//! The local model is usable once loaded and warm. A part that failed for good (a model
//! that could not be loaded) or is still loading degrades the answer (200, listed under
//! `degraded`) as long as the routes are still served: a readiness probe that turned 503
//! would take a box out of service whose gateway serves fine — for the whole of a long
//! model download, or for good when the model cannot load.

use std::collections::HashMap;

use crate::{
    backend::{BackendStatus, Readiness},
    router::Route,
};

/// The verdict, rendered by `status::ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) state: State,
    /// Parts that do not work, e.g. `local: failed: …` or `route tiny: no usable target`.
    pub(crate) degraded: Vec<String>,
    /// Routes with no usable target.
    pub(crate) unserved: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Every part works.
    Ready,
    /// Every route is served; something failed (200).
    Degraded,
    /// Some route waits for a backend that is still loading or warming up (503).
    Starting,
    /// Some route has no usable target (503).
    NotReady,
    /// Nothing is configured at all (503).
    NoBackend,
}

impl State {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Degraded => "degraded",
            State::Starting => "starting",
            State::NotReady => "not_ready",
            State::NoBackend => "no_backend",
        }
    }

    /// Whether `/ready` answers 200.
    pub(crate) fn serves(self) -> bool {
        matches!(self, State::Ready | State::Degraded)
    }
}

/// Judge `routes` given each backend's status (by id).
pub(crate) fn judge(routes: &[std::sync::Arc<Route>], statuses: &[(String, BackendStatus)]) -> Verdict {
    let mut degraded: Vec<String> = statuses
        .iter()
        .filter(|(_, s)| s.readiness != Readiness::Ready)
        .map(|(id, s)| format!("{id}: {}", s.detail))
        .collect();
    if statuses.is_empty() {
        return Verdict {
            state: State::NoBackend,
            degraded,
            unserved: Vec::new(),
        };
    }
    let by_id: HashMap<&str, Readiness> = statuses
        .iter()
        .map(|(id, s)| (id.as_str(), s.readiness))
        .collect();
    let usable = |backend: &str| by_id.get(backend) == Some(&Readiness::Ready);
    let mut unserved = Vec::new();
    let mut required_unserved = false;
    for route in routes {
        let served = route
            .targets
            .iter()
            .chain(route.canary.as_ref().map(|c| &c.target))
            .any(|t| usable(&t.backend));
        if !served {
            unserved.push(route.name.clone());
            degraded.push(format!("route {}: no usable target", route.name));
            required_unserved |= !is_local_catalogue_entry(route);
        }
    }
    let starting = statuses.iter().any(|(_, s)| s.readiness == Readiness::Starting);
    let nothing_served = !routes.is_empty() && unserved.len() == routes.len();
    let state = if required_unserved || nothing_served {
        if starting {
            State::Starting
        } else {
            State::NotReady
        }
    } else if degraded.is_empty() {
        State::Ready
    } else {
        State::Degraded
    };
    Verdict {
        state,
        degraded,
        unserved,
    }
}

/// The route lifeboat adds for the local model under its own name, so clients can ask
/// for it directly. Nobody configured it as a route: when the model failed to load it is
/// reported, but it does not take a box whose configured routes are served out of
/// service (unless it is all the box serves, which `nothing_served` catches). A
/// `[[routes]]` entry with `egress = "local-only"` has its own name and does count.
fn is_local_catalogue_entry(route: &Route) -> bool {
    match route.targets.as_slice() {
        [only] => only.kind == crate::backend::BackendKind::Local && only.model == route.name,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::router::Target;

    fn route(name: &str, targets: &[(&str, &str)]) -> Arc<Route> {
        Arc::new(Route {
            name: name.into(),
            targets: targets
                .iter()
                .map(|(backend, model)| match *backend {
                    crate::backend::LOCAL_BACKEND_ID => Target::local(*model),
                    remote => Target::remote(remote, *model),
                })
                .collect(),
            continue_locally: false,
            hedge: false,
            hedge_after: None,
            canary: None,
        })
    }

    fn status(id: &str, readiness: Readiness, detail: &str) -> (String, BackendStatus) {
        (
            id.into(),
            BackendStatus {
                readiness,
                detail: detail.into(),
            },
        )
    }

    #[test]
    fn a_failed_local_model_degrades_a_box_whose_gateway_serves() {
        let routes = [
            route(
                "deepseek-chat",
                &[("gateway", "deepseek-chat"), ("local", "tiny")],
            ),
            route("tiny", &[("local", "tiny")]),
        ];
        let failed = status("local", Readiness::Failed, "failed: no such file model.gguf");
        let gateway = status("gateway", Readiness::Ready, "ready");
        let verdict = judge(&routes, &[gateway.clone(), failed.clone()]);
        assert_eq!(verdict.state, State::Degraded);
        assert!(verdict.state.serves());
        assert_eq!(
            verdict.degraded,
            [
                "local: failed: no such file model.gguf",
                "route tiny: no usable target"
            ]
        );
        assert_eq!(verdict.unserved, ["tiny"]);

        // Without the gateway nothing is served: not ready.
        let verdict = judge(&routes[1..], std::slice::from_ref(&failed));
        assert_eq!(verdict.state, State::NotReady);
        assert!(!verdict.state.serves());

        // A configured local-only route is a promise to clients: unserved, not ready.
        let private = route("private", &[("local", "tiny")]);
        let verdict = judge(&[routes[0].clone(), private], &[gateway, failed]);
        assert_eq!(verdict.state, State::NotReady);
        assert_eq!(verdict.unserved, ["private"]);
    }

    #[test]
    fn loading_degrades_a_served_box_and_holds_back_one_that_waits_for_it() {
        let routes = [route(
            "deepseek-chat",
            &[("gateway", "deepseek-chat"), ("local", "tiny")],
        )];
        let gateway = status("gateway", Readiness::Ready, "ready");
        let verdict = judge(
            &routes,
            &[gateway.clone(), status("local", Readiness::Starting, "loading")],
        );
        assert_eq!(verdict.state, State::Degraded, "the gateway serves meanwhile");
        assert_eq!(verdict.degraded, ["local: loading"]);
        let private = [route("private", &[("local", "tiny")])];
        let verdict = judge(&private, &[status("local", Readiness::Starting, "loading")]);
        assert_eq!(verdict.state, State::Starting, "nothing serves until it loads");
        assert!(!verdict.state.serves());
        let verdict = judge(&routes, &[gateway, status("local", Readiness::Ready, "ready")]);
        assert_eq!(verdict.state, State::Ready);
        assert!(verdict.degraded.is_empty() && verdict.unserved.is_empty());
    }

    #[test]
    fn no_backend_is_its_own_answer() {
        let verdict = judge(&[], &[]);
        assert_eq!(verdict.state, State::NoBackend);
        assert!(!verdict.state.serves());
    }
}
