//! The Topic controller: creates, grows and deletes a topic on the master
//! of the BrokerGroup it names, through the broker admin API, and reports
//! what the broker holds in the Topic's status. A finalizer makes deletion
//! reach the broker before the object goes.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keelmq_crds::{ANNOTATION_PAUSE, BrokerGroup, MessageType, Topic, TopicStatus};
use keelmq_proto::admin as pb;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use tracing::{Instrument, info, info_span, warn};

use crate::conditions::{self, PAUSED, READY};
use crate::controller::Context;
use crate::model::GroupNames;
use crate::{Error, Result};

/// Finalizer that keeps a Topic until it is deleted from its broker group.
pub const FINALIZER: &str = "keelmq.io/topic";

fn message_type(t: MessageType) -> pb::MessageType {
    match t {
        MessageType::Normal => pb::MessageType::Normal,
        MessageType::Fifo => pb::MessageType::Fifo,
        MessageType::Delay => pb::MessageType::Delay,
        MessageType::Transaction => pb::MessageType::Transaction,
    }
}

fn from_pb(t: i32) -> Option<MessageType> {
    match pb::MessageType::try_from(t).ok()? {
        pb::MessageType::Normal => Some(MessageType::Normal),
        pb::MessageType::Fifo => Some(MessageType::Fifo),
        pb::MessageType::Delay => Some(MessageType::Delay),
        pb::MessageType::Transaction => Some(MessageType::Transaction),
        pb::MessageType::Unspecified => None,
    }
}

/// Reconciles one Topic.
pub async fn reconcile(topic: Arc<Topic>, ctx: Arc<Context>) -> Result<Action> {
    let metrics = ctx.metrics.clone();
    let _timer = metrics.reconcile("Topic");
    let span = info_span!(
        "reconcile",
        kind = "Topic",
        namespace = topic.namespace().unwrap_or_default(),
        name = topic.name_any(),
        generation = topic.metadata.generation.unwrap_or(0),
        trigger = if topic.metadata.deletion_timestamp.is_some() {
            "deleted"
        } else {
            "change or resync"
        },
    );
    async move {
        let ns = topic
            .namespace()
            .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
        let api: Api<Topic> = Api::namespaced(ctx.client.clone(), &ns);
        finalizer(&api, FINALIZER, topic, |event| async {
            match event {
                Finalizer::Apply(t) => apply(&t, &ctx, &api).await,
                Finalizer::Cleanup(t) => cleanup(&t, &ctx).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            kube::runtime::finalizer::Error::AddFinalizer(e)
            | kube::runtime::finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
            kube::runtime::finalizer::Error::UnnamedObject => {
                Error::MissingObjectKey("metadata.name")
            }
            kube::runtime::finalizer::Error::InvalidFinalizer => {
                Error::InvalidSpec("finalizer".into())
            }
        })
    }
    .instrument(span)
    .await
}

/// The topic's group, as far as the topic needs it.
enum GroupMaster {
    /// The group is gone or has no master yet.
    None,
    /// The group carries the pause annotation: nothing is changed on its
    /// brokers until it is removed.
    Paused,
    /// The admin address of the group's master.
    At(String),
}

/// The admin address of the master of the topic's group.
async fn master_admin(topic: &Topic, ctx: &Context) -> Result<GroupMaster> {
    let ns = topic
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let groups: Api<BrokerGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(group) = groups.get_opt(&topic.spec.broker_group).await? else {
        return Ok(GroupMaster::None);
    };
    if group
        .annotations()
        .get(ANNOTATION_PAUSE)
        .map(String::as_str)
        == Some("true")
    {
        return Ok(GroupMaster::Paused);
    }
    let names = GroupNames::of(&group)?;
    Ok(group
        .status
        .and_then(|s| s.master)
        .map_or(GroupMaster::None, |m| {
            GroupMaster::At(ctx.addresses.admin(&names, &m))
        }))
}

fn paused_message(group: &str) -> String {
    format!(
        "broker group {group} has {ANNOTATION_PAUSE}=true: the topic is not changed on its brokers until it is removed"
    )
}

async fn apply(topic: &Topic, ctx: &Context, api: &Api<Topic>) -> Result<Action> {
    let name = topic.topic_name();
    let group = &topic.spec.broker_group;
    let addr = match master_admin(topic, ctx).await? {
        GroupMaster::At(addr) => addr,
        GroupMaster::Paused => {
            let msg = paused_message(group);
            let mut status = topic.status.clone().unwrap_or_default();
            if !conditions::is_true(&status.conditions, PAUSED) {
                info!("{msg}");
            }
            conditions::set(
                &mut status.conditions,
                PAUSED,
                true,
                "GroupPaused",
                msg,
                topic.metadata.generation,
                &Time(jiff::Timestamp::now()),
            );
            let patch = serde_json::json!({ "status": status });
            api.patch_status(
                &topic.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        GroupMaster::None => {
            info!("broker group {group} has no master yet; topic {name} waits");
            write_status(
                api,
                topic,
                None,
                false,
                "NoMaster",
                format!("broker group {group} has no serving master yet"),
            )
            .await?;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
    };
    let admin_err = |op: &'static str| {
        move |message: String| Error::Admin {
            broker: addr_label(group),
            op,
            message,
        }
    };
    let want = u32::try_from(topic.spec.queues).unwrap_or(1);
    let info = match ctx
        .admin
        .describe_topic(&addr, &name)
        .await
        .map_err(admin_err("describe topic"))?
    {
        None => {
            info!(
                queues = want,
                "creating topic {name} on broker group {group}"
            );
            ctx.admin
                .create_topic(
                    &addr,
                    pb::CreateTopicRequest {
                        name: name.clone(),
                        queue_count: want,
                        message_type: message_type(topic.spec.message_type) as i32,
                    },
                )
                .await
                .map_err(admin_err("create topic"))?
        }
        Some(info) if info.queue_count < want => {
            info!(
                from = info.queue_count,
                to = want,
                "growing topic {name} from {} to {want} queues",
                info.queue_count
            );
            ctx.admin
                .update_topic(
                    &addr,
                    pb::UpdateTopicRequest {
                        name: name.clone(),
                        queue_count: want,
                    },
                )
                .await
                .map_err(admin_err("update topic"))?
        }
        Some(info) => info,
    };
    let ok =
        info.queue_count >= want && from_pb(info.message_type) == Some(topic.spec.message_type);
    let msg = if ok {
        format!(
            "broker group {group} holds topic {name} with {} queues",
            info.queue_count
        )
    } else {
        format!(
            "broker group {group} holds topic {name} with {} queues of type {:?}, which differs from the spec",
            info.queue_count,
            from_pb(info.message_type)
        )
    };
    write_status(
        api,
        topic,
        Some(&info),
        ok,
        if ok { "Created" } else { "Differs" },
        msg,
    )
    .await?;
    // Checked again soon: after a failover the new master may lack the topic.
    Ok(Action::requeue(Duration::from_secs(30)))
}

fn addr_label(group: &str) -> String {
    format!("master of {group}")
}

async fn write_status(
    api: &Api<Topic>,
    topic: &Topic,
    info: Option<&pb::TopicInfo>,
    ready: bool,
    reason: &str,
    message: String,
) -> Result<()> {
    let mut status = topic.status.clone().unwrap_or_default();
    let now = Time(jiff::Timestamp::now());
    conditions::set(
        &mut status.conditions,
        READY,
        ready,
        reason,
        message,
        topic.metadata.generation,
        &now,
    );
    if conditions::is_true(&status.conditions, PAUSED) {
        conditions::set(
            &mut status.conditions,
            PAUSED,
            false,
            "Reconciling",
            "the operator manages this topic",
            topic.metadata.generation,
            &now,
        );
    }
    status.observed_generation = topic.metadata.generation;
    if let Some(info) = info {
        status.queues = i32::try_from(info.queue_count).unwrap_or(i32::MAX);
        status.message_type = from_pb(info.message_type);
    }
    let patch = serde_json::json!({ "status": TopicStatus { ..status } });
    api.patch_status(
        &topic.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn cleanup(topic: &Topic, ctx: &Context) -> Result<Action> {
    let name = topic.topic_name();
    match master_admin(topic, ctx).await? {
        // The topic stays (with its finalizer) until the pause is lifted.
        GroupMaster::Paused => return Err(Error::Paused(topic.spec.broker_group.clone())),
        GroupMaster::At(addr) => {
            info!(
                "deleting topic {name} from broker group {}",
                topic.spec.broker_group
            );
            ctx.admin
                .delete_topic(&addr, &name)
                .await
                .map_err(|message| Error::Admin {
                    broker: addr_label(&topic.spec.broker_group),
                    op: "delete topic",
                    message,
                })?;
        }
        GroupMaster::None => info!(
            "broker group {} is gone or has no master; nothing to delete for topic {name}",
            topic.spec.broker_group
        ),
    }
    Ok(Action::await_change())
}

/// Counts a failed Topic reconcile and retries.
pub fn error_policy(topic: Arc<Topic>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(namespace = topic.namespace().unwrap_or_default(), name = topic.name_any(), %error, "topic reconcile failed");
    ctx.metrics.error("Topic", error);
    match error {
        Error::Paused(_) => Action::requeue(Duration::from_secs(30)),
        _ => Action::requeue(Duration::from_secs(10)),
    }
}
