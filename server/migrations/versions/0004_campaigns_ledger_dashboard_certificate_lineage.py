"""campaigns, ledger, dashboard, certificate lineage

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 02:57:51.540756
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_CERTIFICATE_SOURCE = sa.Enum("DEVICE_CA", "OPERATOR_CA", name="certificatesource")


def upgrade() -> None:
    op.create_table(
        "dashboardsession",
        sa.Column("id_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("operator", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("csrf_token", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("method", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("address", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id_sha256"),
    )
    with op.batch_alter_table("dashboardsession", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dashboardsession_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_dashboardsession_operator"), ["operator"], unique=False
        )

    op.create_table(
        "operatorpassword",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("password_hash", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_by", sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "release",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("images", sqlmodel.sql.sqltypes.AutoString(length=8000), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "storedmanifest",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vin", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("received_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("content_stored", sa.Boolean(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("storedmanifest", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_storedmanifest_vin"), ["vin"], unique=False)

    op.create_table(
        "vehicleattributes",
        sa.Column("vin", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("model", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("year", sa.Integer(), nullable=True),
        sa.Column("region", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("tags", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("vin"),
    )
    with op.batch_alter_table("vehicleattributes", schema=None) as batch_op:
        batch_op.create_index("ix_vehicleattributes_model", ["model"], unique=False)

    op.create_table(
        "campaign",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("release", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("paused_from", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("selection", sqlmodel.sql.sqltypes.AutoString(length=4000), nullable=False),
        sa.Column(
            "maintenance_windows", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False
        ),
        sa.Column("install_on_consent", sa.Boolean(), nullable=False),
        sa.Column("current_phase", sa.Integer(), nullable=False),
        sa.Column("sweep_after", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("swept_phase", sa.Integer(), nullable=False),
        sa.Column("withdrawing", sa.Boolean(), nullable=False),
        sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("approved_by", sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.Column("approved_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["release"],
            ["release.name"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("campaign", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_campaign_state"), ["state"], unique=False)

    op.create_table(
        "ledgerentry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vin", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("ecu_serial", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("hardware_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("change", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("filepath", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("version", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("install_filepath", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("install_result", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("detail", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("manifest_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["manifest_id"],
            ["storedmanifest.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ledgerentry", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledgerentry_change"), ["change"], unique=False)
        batch_op.create_index(batch_op.f("ix_ledgerentry_ecu_serial"), ["ecu_serial"], unique=False)
        batch_op.create_index(batch_op.f("ix_ledgerentry_filepath"), ["filepath"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_ledgerentry_manifest_id"), ["manifest_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_ledgerentry_version"), ["version"], unique=False)
        batch_op.create_index(batch_op.f("ix_ledgerentry_vin"), ["vin"], unique=False)

    op.create_table(
        "campaignphase",
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("percent", sa.Float(), nullable=False),
        sa.Column("success_threshold", sa.Float(), nullable=False),
        sa.Column("failure_threshold", sa.Float(), nullable=False),
        sa.Column("on_failure", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column("min_finished", sa.Integer(), nullable=False),
        sa.Column("joined", sa.BigInteger(), nullable=False),
        sa.Column("offered", sa.BigInteger(), nullable=False),
        sa.Column("succeeded", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("skipped", sa.BigInteger(), nullable=False),
        sa.Column("cancelled", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaign.id"],
        ),
        sa.PrimaryKeyConstraint("campaign_id", "index"),
    )
    op.create_table(
        "campaignvehicle",
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("vin", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=24), nullable=False),
        sa.Column("assignments", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("detail", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaign.id"],
        ),
        sa.PrimaryKeyConstraint("campaign_id", "vin"),
    )
    with op.batch_alter_table("campaignvehicle", schema=None) as batch_op:
        batch_op.create_index(
            "ix_campaignvehicle_campaign_state_updated",
            ["campaign_id", "state", "updated_at"],
            unique=False,
        )
        batch_op.create_index("ix_campaignvehicle_vin", ["vin"], unique=False)

    with op.batch_alter_table("assignment", schema=None) as batch_op:
        batch_op.create_index("ix_assignment_status_vin", ["status", "vin"], unique=False)

    with op.batch_alter_table("ecu", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ecu_hardware_id_installed",
            ["hardware_id", "installed_filepath", "vin"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_ecu_installed_filepath"), ["installed_filepath"], unique=False
        )
        batch_op.create_index(
            "ix_ecu_vin_installed", ["vin", "hardware_id", "installed_filepath"], unique=False
        )
        batch_op.create_index(
            "ix_ecu_vin_installed_filepath", ["vin", "installed_filepath"], unique=False
        )

    with op.batch_alter_table("securityevent", schema=None) as batch_op:
        batch_op.create_index("ix_securityevent_kind_vin", ["kind", "vin"], unique=False)

    with op.batch_alter_table("vehicle", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_vehicle_last_manifest_at"), ["last_manifest_at"], unique=False
        )
        batch_op.create_index("ix_vehicle_revoked_at", ["revoked_at"], unique=False)

    # Certificates recorded before this revision were issued by the server's device CA
    # (operator-CA certificates were not recorded) and renewed from nothing known.
    _CERTIFICATE_SOURCE.create(op.get_bind(), checkfirst=True)
    with op.batch_alter_table("vehiclecertificate", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source", _CERTIFICATE_SOURCE, nullable=False, server_default="DEVICE_CA")
        )
        batch_op.add_column(
            sa.Column(
                "renewed_from_serial",
                sqlmodel.sql.sqltypes.AutoString(length=64),
                nullable=False,
                server_default="",
            )
        )
        batch_op.add_column(
            sa.Column(
                "renewed_from_issuer",
                sqlmodel.sql.sqltypes.AutoString(length=64),
                nullable=False,
                server_default="",
            )
        )
        batch_op.create_index(
            batch_op.f("ix_vehiclecertificate_renewed_from_serial"),
            ["renewed_from_serial"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("vehiclecertificate", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vehiclecertificate_renewed_from_serial"))
        batch_op.drop_column("renewed_from_issuer")
        batch_op.drop_column("renewed_from_serial")
        batch_op.drop_column("source")
    _CERTIFICATE_SOURCE.drop(op.get_bind(), checkfirst=True)

    with op.batch_alter_table("vehicle", schema=None) as batch_op:
        batch_op.drop_index("ix_vehicle_revoked_at")
        batch_op.drop_index(batch_op.f("ix_vehicle_last_manifest_at"))

    with op.batch_alter_table("securityevent", schema=None) as batch_op:
        batch_op.drop_index("ix_securityevent_kind_vin")

    with op.batch_alter_table("ecu", schema=None) as batch_op:
        batch_op.drop_index("ix_ecu_vin_installed_filepath")
        batch_op.drop_index("ix_ecu_vin_installed")
        batch_op.drop_index(batch_op.f("ix_ecu_installed_filepath"))
        batch_op.drop_index("ix_ecu_hardware_id_installed")

    with op.batch_alter_table("assignment", schema=None) as batch_op:
        batch_op.drop_index("ix_assignment_status_vin")

    with op.batch_alter_table("campaignvehicle", schema=None) as batch_op:
        batch_op.drop_index("ix_campaignvehicle_vin")
        batch_op.drop_index("ix_campaignvehicle_campaign_state_updated")

    op.drop_table("campaignvehicle")
    op.drop_table("campaignphase")
    with op.batch_alter_table("ledgerentry", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledgerentry_vin"))
        batch_op.drop_index(batch_op.f("ix_ledgerentry_version"))
        batch_op.drop_index(batch_op.f("ix_ledgerentry_manifest_id"))
        batch_op.drop_index(batch_op.f("ix_ledgerentry_filepath"))
        batch_op.drop_index(batch_op.f("ix_ledgerentry_ecu_serial"))
        batch_op.drop_index(batch_op.f("ix_ledgerentry_change"))

    op.drop_table("ledgerentry")
    with op.batch_alter_table("campaign", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_campaign_state"))

    op.drop_table("campaign")
    with op.batch_alter_table("vehicleattributes", schema=None) as batch_op:
        batch_op.drop_index("ix_vehicleattributes_model")

    op.drop_table("vehicleattributes")
    with op.batch_alter_table("storedmanifest", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_storedmanifest_vin"))

    op.drop_table("storedmanifest")
    op.drop_table("release")
    op.drop_table("operatorpassword")
    with op.batch_alter_table("dashboardsession", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dashboardsession_operator"))
        batch_op.drop_index(batch_op.f("ix_dashboardsession_expires_at"))

    op.drop_table("dashboardsession")
