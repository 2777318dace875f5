//! Every Kubernetes permission the operator's code uses, in one table: the
//! Helm chart's ClusterRole/Role is generated from it (`keelmq-operator
//! rbac`), and a test proves that the requests the reconcilers issue are
//! exactly covered by it (nothing missing, nothing unused).

use serde::Serialize;

/// One rule: these verbs on these resources of these API groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Permission {
    /// API groups (`""` is the core group).
    pub api_groups: &'static [&'static str],
    /// Resources, with `/subresource` where it applies.
    pub resources: &'static [&'static str],
    /// Verbs.
    pub verbs: &'static [&'static str],
    /// false when the permission needs cluster scope (a ClusterRole).
    pub namespaced: bool,
}

/// The table.
pub const PERMISSIONS: &[Permission] = &[
    Permission {
        api_groups: &["keelmq.io"],
        resources: &["brokergroups"],
        verbs: &["get", "list", "watch", "patch"],
        namespaced: true,
    },
    Permission {
        api_groups: &["keelmq.io"],
        resources: &["topics"],
        verbs: &["list", "watch", "patch"],
        namespaced: true,
    },
    Permission {
        api_groups: &["keelmq.io"],
        resources: &["brokergroups/status"],
        verbs: &["patch", "update"],
        namespaced: true,
    },
    Permission {
        api_groups: &["keelmq.io"],
        resources: &["topics/status"],
        verbs: &["patch"],
        namespaced: true,
    },
    // The owned kinds are written with server-side apply, which the API
    // server authorises as `patch` and, when the object does not exist yet,
    // also as `create`.
    Permission {
        api_groups: &[""],
        resources: &["configmaps", "services"],
        verbs: &["list", "watch", "create", "patch"],
        namespaced: true,
    },
    Permission {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["list", "watch", "patch", "delete"],
        namespaced: true,
    },
    Permission {
        api_groups: &["apps"],
        resources: &["statefulsets"],
        verbs: &["get", "list", "watch", "create", "patch"],
        namespaced: true,
    },
    Permission {
        api_groups: &["policy"],
        resources: &["poddisruptionbudgets"],
        verbs: &["list", "watch", "create", "patch"],
        namespaced: true,
    },
    // The NetworkPolicy of each group: applied like the other owned kinds,
    // and deleted (after a list by label finds it) when the spec turns it
    // off.
    Permission {
        api_groups: &["networking.k8s.io"],
        resources: &["networkpolicies"],
        verbs: &["list", "watch", "create", "patch", "delete"],
        namespaced: true,
    },
    Permission {
        api_groups: &["events.k8s.io"],
        resources: &["events"],
        verbs: &["create", "patch"],
        namespaced: true,
    },
    Permission {
        api_groups: &["coordination.k8s.io"],
        resources: &["leases"],
        verbs: &["get", "create", "update"],
        namespaced: true,
    },
];

/// The table as the JSON `keelmq-operator rbac` prints.
pub fn to_json() -> String {
    serde_json::to_string_pretty(PERMISSIONS).unwrap_or_else(|_| "[]".into())
}

/// Whether the table allows `verb` on `group`/`resource`.
pub fn allows(group: &str, resource: &str, verb: &str) -> bool {
    PERMISSIONS.iter().any(|p| {
        p.api_groups.contains(&group) && p.resources.contains(&resource) && p.verbs.contains(&verb)
    })
}
