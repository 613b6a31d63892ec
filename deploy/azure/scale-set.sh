#!/usr/bin/env bash
# Several aml-egress NVA VMs behind an internal Standard Load Balancer (HA ports, health
# probe on /readyz), with the compute subnet's route table pointing at its front end.
# Not run by the project's CI (no Azure there): README lists it. Set the variables first.
set -euo pipefail

rg=${RG:?set RG, the resource group}
vnet=${VNET:?set VNET, the virtual network}
nva_subnet=${NVA_SUBNET:?set NVA_SUBNET, the appliances subnet}
compute_subnet=${COMPUTE_SUBNET:?set COMPUTE_SUBNET, the compute subnet}
frontend_ip=${FRONTEND_IP:?set FRONTEND_IP, a free address in the appliances subnet}
region=${REGION:-westeurope}
here=$(cd "$(dirname "$0")" && pwd)

az network lb create -g "$rg" -n aml-egress-lb --sku Standard \
    --vnet-name "$vnet" --subnet "$nva_subnet" --private-ip-address "$frontend_ip" \
    --frontend-ip-name fe --backend-pool-name nva
# The probe asks /readyz on the admin port: an instance that is draining
# (proxy.shutdown_delay_secs) leaves the rotation before it stops accepting.
az network lb probe create -g "$rg" --lb-name aml-egress-lb -n readyz \
    --protocol Http --port 9464 --path /readyz --interval 5 --probe-threshold 2
az network lb rule create -g "$rg" --lb-name aml-egress-lb -n ha-ports \
    --protocol All --frontend-port 0 --backend-port 0 \
    --frontend-ip-name fe --backend-pool-name nva --probe-name readyz

az vmss create -g "$rg" -n aml-egress --image Debian:debian-12:12:latest \
    --instance-count 2 --vm-sku Standard_D2s_v5 --location "$region" \
    --vnet-name "$vnet" --subnet "$nva_subnet" --lb aml-egress-lb --backend-pool-name nva \
    --custom-data "$here/cloud-init.yaml" --upgrade-policy-mode Rolling \
    --admin-username azureuser --generate-ssh-keys
az vmss update -g "$rg" -n aml-egress --set virtualMachineProfile.networkProfile.networkInterfaceConfigurations[0].enableIPForwarding=true

az network route-table create -g "$rg" -n aml-compute
az network route-table route create -g "$rg" --route-table-name aml-compute -n default \
    --address-prefix 0.0.0.0/0 --next-hop-type VirtualAppliance --next-hop-ip-address "$frontend_ip"
az network route-table route create -g "$rg" --route-table-name aml-compute -n aml \
    --address-prefix AzureMachineLearning --next-hop-type Internet
az network route-table route create -g "$rg" --route-table-name aml-compute -n batch \
    --address-prefix "BatchNodeManagement.$region" --next-hop-type Internet
az network vnet subnet update -g "$rg" --vnet-name "$vnet" -n "$compute_subnet" \
    --route-table aml-compute
