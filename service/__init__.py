"""crm-erp-sync: CRM -> Kafka -> ERP change data synchronisation."""

__version__ = "0.1.0"
