//! The route table: public model names and aliases → an ordered list of targets
//! (remote gateways first, the local model last), per the egress policy of each route.

use std::{collections::HashMap, sync::Arc};

use crate::{
    backend::{BackendKind, LOCAL_BACKEND_ID},
    config::{Config, Egress, RouteConfig},
};

/// One place a public model name can be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Backend id (the remote's key in `[remotes]`).
    pub backend: String,
    /// Model name at that backend.
    pub model: String,
    /// Remote or the local model.
    pub kind: BackendKind,
}

impl Target {
    /// `model` at the remote `backend`.
    pub fn remote(backend: impl Into<String>, model: impl Into<String>) -> Target {
        Target {
            backend: backend.into(),
            model: model.into(),
            kind: BackendKind::Remote,
        }
    }

    /// The local model, served as `model`.
    pub fn local(model: impl Into<String>) -> Target {
        Target {
            backend: LOCAL_BACKEND_ID.to_string(),
            model: model.into(),
            kind: BackendKind::Local,
        }
    }
}

/// A public model name and where it is served, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The public model name.
    pub name: String,
    /// Where it is served, in order of preference.
    pub targets: Vec<Target>,
    /// A stream that breaks after the commit point is continued by the local target.
    pub continue_locally: bool,
    /// Race the local target when the remote is slow to its first token.
    pub hedge: bool,
    /// Hedge delay; `None`: the remote's observed p95 TTFT.
    pub hedge_after: Option<std::time::Duration>,
    /// A target tried first for `share` of the requests, ahead of `targets`.
    pub canary: Option<Canary>,
}

impl Route {
    /// The local model's target on this route, if it has one.
    pub fn local_target(&self) -> Option<&Target> {
        self.targets.iter().find(|t| t.kind == BackendKind::Local)
    }
}

/// See [`Route::canary`].
#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    /// The canary's target.
    pub target: Target,
    /// Share of requests (0 to 1) it is tried first for.
    pub share: f64,
}

impl Eq for Canary {}

/// What `/v1/models` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The public model name.
    pub id: String,
    /// The backend that serves it first.
    pub owned_by: String,
}

/// Public names and aliases → routes.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Public names in listing order (aliases are not listed).
    public: Vec<Arc<Route>>,
    by_name: HashMap<String, Arc<Route>>,
}

impl RouteTable {
    /// Build from a validated config: every remote model under its own name, then each
    /// `[[routes]]` entry with its aliases.
    pub fn from_config(config: &Config) -> RouteTable {
        let mut table = RouteTable::default();
        let local = config.local.served_name().map(Target::local);
        // With `local.fallback`, the local model backs up every remote-preferred route.
        let fallback = local.clone().filter(|_| config.local.fallback);
        let with_fallback =
            |remote: Target| -> Vec<Target> { std::iter::once(remote).chain(fallback.clone()).collect() };
        let remote_only = |remote: Target| vec![remote];
        for (remote, settings) in &config.remotes {
            let targets = match settings.egress {
                Egress::RemoteOnly => &remote_only as &dyn Fn(Target) -> Vec<Target>,
                _ => &with_fallback,
            };
            for model in &settings.models {
                table.add(
                    Route {
                        name: model.clone(),
                        targets: targets(Target::remote(remote, model)),
                        continue_locally: settings.continue_locally,
                        hedge: settings.hedge,
                        hedge_after: settings.hedge_after,
                        canary: None,
                    },
                    &[],
                );
            }
        }
        if let Some(name) = config.local.served_name() {
            table.add(
                Route {
                    name: name.clone(),
                    targets: vec![Target::local(name)],
                    continue_locally: false,
                    hedge: false,
                    hedge_after: None,
                    canary: None,
                },
                &[],
            );
        }
        for route in &config.routes {
            table.add(
                configured_route(route, local.as_ref(), fallback.as_ref()),
                &route.aliases,
            );
        }
        table
    }

    fn add(&mut self, route: Route, aliases: &[String]) {
        let route = Arc::new(route);
        self.public.push(route.clone());
        self.by_name.insert(route.name.clone(), route.clone());
        for alias in aliases {
            self.by_name.insert(alias.clone(), route.clone());
        }
    }

    /// Routes under their public names, in listing order (aliases are not listed).
    pub fn public(&self) -> &[Arc<Route>] {
        &self.public
    }

    /// The route for a public name or alias.
    pub fn resolve(&self, model: &str) -> Option<&Arc<Route>> {
        self.by_name.get(model)
    }
}

/// A `[[routes]]` entry: its remote, then its `fallbacks` in order, then (per its egress)
/// the local model; `local` is the local target, `fallback` the same when it backs up
/// remote-preferred routes.
fn configured_route(route: &RouteConfig, local: Option<&Target>, fallback: Option<&Target>) -> Route {
    let target =
        |backend: &str, entry_model: Option<&String>| Target::remote(backend, route.model_at(entry_model));
    let remotes = std::iter::once(target(&route.remote, None)).chain(
        route
            .fallbacks
            .iter()
            .map(|f| target(&f.remote, f.remote_model.as_ref())),
    );
    let targets = match route.egress {
        Egress::RemotePreferred => remotes.chain(fallback.cloned()).collect(),
        Egress::RemoteOnly => remotes.collect(),
        Egress::LocalOnly => local.cloned().into_iter().collect(),
    };
    Route {
        name: route.name.clone(),
        targets,
        continue_locally: route.continue_locally,
        hedge: route.hedge,
        hedge_after: route.hedge_after,
        canary: route.canary.as_ref().map(|c| Canary {
            target: target(&c.remote, c.remote_model.as_ref()),
            share: c.share,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{Router, RouterSettings};

    #[test]
    fn route_table_resolves_names_and_aliases() {
        let config = Config::from_toml(
            "[remotes.g]\nbase_url = \"http://x/v1\"\nmodels = [\"deepseek-chat\"]\n\
             [[routes]]\nname = \"deepseek-v3\"\naliases = [\"ds/v3\"]\nremote = \"g\"\nremote_model = \"deepseek-chat\"\n",
            "t",
        )
        .expect("parses");
        let table = RouteTable::from_config(&config);
        assert_eq!(
            table.resolve("ds/v3").expect("alias").targets[0].model,
            "deepseek-chat"
        );
        assert_eq!(table.resolve("deepseek-v3").expect("name").name, "deepseek-v3");
        assert!(table.resolve("gpt-4").is_none());
        let router = Router::new(table, vec![], RouterSettings::default());
        let ids: Vec<String> = router.models().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, vec!["deepseek-chat", "deepseek-v3"]);
    }

    #[test]
    fn fallbacks_come_after_the_route_remote_and_before_the_local_model() {
        let config = Config::from_toml(
            "[remotes.a]\nbase_url = \"http://a/v1\"\n[remotes.b]\nbase_url = \"http://b/v1\"\n\
             [remotes.c]\nbase_url = \"http://c/v1\"\n[local]\nmodel = \"m\"\nserved_model_name = \"tiny\"\n\
             [[routes]]\nname = \"chat\"\nremote = \"a\"\nremote_model = \"deepseek-chat\"\n\
             fallbacks = [{ remote = \"b\" }, { remote = \"c\", remote_model = \"r1-32b\" }]\n",
            "t",
        )
        .expect("parses");
        let table = RouteTable::from_config(&config);
        let targets: Vec<(String, String)> = table
            .resolve("chat")
            .expect("route")
            .targets
            .iter()
            .map(|t| (t.backend.clone(), t.model.clone()))
            .collect();
        let pairs = [
            ("a", "deepseek-chat"),
            ("b", "deepseek-chat"),
            ("c", "r1-32b"),
            (LOCAL_BACKEND_ID, "tiny"),
        ];
        let expected: Vec<(String, String)> = pairs
            .iter()
            .map(|(b, m)| (b.to_string(), m.to_string()))
            .collect();
        assert_eq!(targets, expected);
    }
}
